package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/tether-io/tether/proto/tetherpb"
)

func newVolumeCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "volume",
		Short: "Create, list and inspect replicated volumes",
	}
	cmd.AddCommand(newVolumeCreateCmd(g), newVolumeLsCmd(g), newVolumeInspectCmd(g),
		newVolumeRmCmd(g), newVolumeUndeleteCmd(g), newVolumePurgeCmd(g))
	return cmd
}

func newVolumeCreateCmd(g *globals) *cobra.Command {
	var replicas uint32
	cmd := &cobra.Command{
		Use:   "create NAME",
		Short: "Create a volume; this host becomes its primary",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if replicas == 0 {
				return fmt.Errorf("--replicas must be at least 1 (it counts the primary)")
			}
			return g.client(cmd, func(ctx context.Context, c tetherpb.ControlClient) error {
				resp, err := c.VolumeCreate(ctx, &tetherpb.VolumeCreateRequest{Name: args[0], Replicas: replicas})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(stdout(cmd), resp.Volume)
				}
				v := resp.Volume
				fmt.Fprintf(stdout(cmd), "Created volume %s: primary %s, replicas %s, epoch %d\n",
					v.Name, v.Primary, orNone(strings.Join(v.ReplicaNodes, ", ")), v.Epoch)
				if v.Path != "" {
					fmt.Fprintf(stdout(cmd), "Data directory on this host: %s\n", v.Path)
				}
				return nil
			})
		},
	}
	cmd.Flags().Uint32Var(&replicas, "replicas", 3, "number of copies, counting the primary")
	return cmd
}

func newVolumeLsCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List volumes",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.client(cmd, func(ctx context.Context, c tetherpb.ControlClient) error {
				resp, err := c.VolumeList(ctx, &tetherpb.VolumeListRequest{})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(stdout(cmd), resp)
				}
				w := table(stdout(cmd))
				fmt.Fprintln(w, "NAME\tSTATE\tPRIMARY\tREPLICAS\tEPOCH")
				for _, v := range resp.Volumes {
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\n", v.Name, v.State, orNone(v.Primary), orNone(strings.Join(v.ReplicaNodes, ",")), v.Epoch)
				}
				return w.Flush()
			})
		},
	}
}

func newVolumeInspectCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show a volume: placement, epoch, and each replica's lag",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.client(cmd, func(ctx context.Context, c tetherpb.ControlClient) error {
				resp, err := c.VolumeInspect(ctx, &tetherpb.VolumeInspectRequest{Name: args[0]})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(stdout(cmd), resp)
				}
				return printInspect(stdout(cmd), resp)
			})
		},
	}
}

func printInspect(out io.Writer, resp *tetherpb.VolumeInspectResponse) error {
	v := resp.Volume
	w := table(out)
	fmt.Fprintf(w, "Name:\t%s\n", v.Name)
	fmt.Fprintf(w, "State:\t%s\n", v.State)
	fmt.Fprintf(w, "Primary:\t%s\n", orNone(v.Primary))
	fmt.Fprintf(w, "Replicas:\t%s (%d copies requested)\n", orNone(strings.Join(v.ReplicaNodes, ", ")), v.Replicas)
	fmt.Fprintf(w, "Epoch:\t%d\n", v.Epoch)
	fmt.Fprintf(w, "Created:\t%s\n", time.Unix(0, v.CreatedUnixNano).UTC().Format(time.RFC3339))
	if v.Path != "" {
		fmt.Fprintf(w, "Path here:\t%s\n", v.Path)
	}
	if v.DeletedUnixNano != 0 {
		fmt.Fprintf(w, "Deleted:\t%s (purged after %s; tether volume undelete %s)\n", fmtTime(v.DeletedUnixNano), fmtTime(v.PurgeAfterUnixNano), v.Name)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	st := resp.Status
	if st == nil {
		return nil
	}
	if st.Error != "" {
		fmt.Fprintf(out, "\nReplication: unknown (%s)\n", st.Error)
		return nil
	}
	fmt.Fprintf(out, "\nReplication (epoch %d, batch %d):\n", st.Epoch, st.Seq)
	return printReplicaTable(out, st)
}

func printReplicaTable(out io.Writer, st *tetherpb.VolumeStatus) error {
	w := table(out)
	fmt.Fprintln(w, "  REPLICA\tCONNECTED\tACKED BATCH\tLAG\tERROR")
	for _, r := range st.Replicas {
		fmt.Fprintf(w, "  %s\t%v\t%d\t%s\t%s\n", r.Node, r.Connected, r.AckedSeq,
			(time.Duration(r.LagMs) * time.Millisecond).String(), r.Error)
	}
	return w.Flush()
}
