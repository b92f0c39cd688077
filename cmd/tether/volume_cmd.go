package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/tether-io/tether/proto/tetherpb"
	"github.com/tether-io/tether/replication"
)

func newVolumeCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "volume",
		Short: "Create, list and inspect replicated volumes",
	}
	cmd.AddCommand(newVolumeCreateCmd(g), newVolumeLsCmd(g), newVolumeInspectCmd(g), newVolumePromoteCmd(g), newVolumeMoveCmd(g), newVolumeUpdateCmd(g),
		newVolumeRmCmd(g), newVolumeUndeleteCmd(g), newVolumePurgeCmd(g))
	return cmd
}

func newVolumeCreateCmd(g *globals) *cobra.Command {
	var replicas uint32
	var maxLag time.Duration
	var placement map[string]string
	var freeze bool
	cmd := &cobra.Command{
		Use:   "create NAME",
		Short: "Create a volume; this host becomes its primary",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if replicas == 0 {
				return fmt.Errorf("--replicas must be at least 1 (it counts the primary)")
			}
			if maxLag < 0 {
				return fmt.Errorf("--max-lag must not be negative (0 means no limit)")
			}
			lagMs := maxLag.Milliseconds()
			if maxLag == 0 {
				lagMs = -1 // no limit
			} else if lagMs == 0 {
				return fmt.Errorf("--max-lag %s is below a millisecond", maxLag)
			}
			return g.client(cmd, func(ctx context.Context, c tetherpb.ControlClient) error {
				resp, err := c.VolumeCreate(ctx, &tetherpb.VolumeCreateRequest{Name: args[0], Replicas: replicas, MaxLagMs: lagMs, Placement: placement, Freeze: freeze})
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
	cmd.Flags().DurationVar(&maxLag, "max-lag", 5*time.Minute, "automatic failover refuses a copy further behind than this (0: no limit)")
	cmd.Flags().StringToStringVar(&placement, "placement", nil, "only nodes with this label hold copies, KEY=VALUE (repeatable; see tether agent --label)")
	cmd.Flags().BoolVar(&freeze, "freeze", false, "pause the volume's containers for a moment when writers never go quiet enough for a point-in-time cut (databases; needs the Docker volume driver)")
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
	maxLag := "no limit"
	if v.MaxLagMs > 0 {
		maxLag = (time.Duration(v.MaxLagMs) * time.Millisecond).String()
	}
	fmt.Fprintf(w, "Max lag:\t%s\n", maxLag)
	if len(v.Placement) > 0 {
		fmt.Fprintf(w, "Placement:\t%s\n", labelString(v.Placement))
	}
	fmt.Fprintf(w, "Freeze:\t%v\n", v.Freeze)
	for _, c := range v.Containers {
		fmt.Fprintf(w, "Re-created on failover:\t%s (image %s, recorded on %s)\n", c.Name, c.Image, c.Node)
	}
	if v.Blocked != "" {
		fmt.Fprintf(w, "NEEDS OPERATOR:\t%s\n", v.Blocked)
	}
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
	fmt.Fprintf(out, "\nReplication (epoch %d, batch %d, %d cuts, %d of them consistent file by file only):\n", st.Epoch, st.Seq, st.Cuts, st.FileConsistentOnlyCuts)
	return printReplicaTable(out, st)
}

func printReplicaTable(out io.Writer, st *tetherpb.VolumeStatus) error {
	if st.WatchLimit != "" {
		fmt.Fprintf(out, "  WATCH LIMIT: %s\n", st.WatchLimit)
	}
	if st.CutError != "" {
		fmt.Fprintf(out, "  CUT FAILING: %s\n", st.CutError)
	}
	w := table(out)
	fmt.Fprintln(w, "  REPLICA\tCONNECTED\tACKED BATCH\tLAST DURABLE CUT\tLAG\tLAG BYTES\tPENDING CUTS\tFULL SYNC\tERROR")
	for _, r := range st.Replicas {
		cut := "-"
		if r.AckedCutUnixNano != 0 {
			cut = fmtTime(r.AckedCutUnixNano)
		}
		fmt.Fprintf(w, "  %s\t%v\t%d\t%s\t%s\t%d\t%d\t%s\t%s\n", r.Node, r.Connected, r.AckedSeq, cut,
			(time.Duration(r.LagMs) * time.Millisecond).String(), r.LagBytes, r.PendingCuts,
			fullSync(r.FullSyncDoneBytes, r.FullSyncTotalBytes), r.Error)
	}
	return w.Flush()
}

func newVolumePromoteCmd(g *globals) *cobra.Command {
	var to string
	var force bool
	cmd := &cobra.Command{
		Use:   "promote NAME --to NODE",
		Short: "Make a replica the primary in place of a dead primary (operator failover)",
		Long: `Make NODE the primary of a volume whose primary is dead, in the next epoch.
tether does this by itself unless every live copy is further behind than the
volume's max lag; then an operator decides: --force accepts losing what the
copy is missing. What the old primary wrote after its epoch ended is kept in
its quarantine when it returns, never merged.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return fmt.Errorf("--to NODE is required")
			}
			return g.client(cmd, func(ctx context.Context, c tetherpb.ControlClient) error {
				resp, err := c.VolumePromote(ctx, &tetherpb.VolumePromoteRequest{Name: args[0], To: to, Force: force})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(stdout(cmd), resp)
				}
				fmt.Fprintf(stdout(cmd), "Promoted %s to primary of %s in epoch %d (its copy was %s behind the old primary's last batch)\n",
					resp.Volume.Primary, resp.Volume.Name, resp.Volume.Epoch, time.Duration(resp.BehindMs)*time.Millisecond)
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "the replica to promote")
	cmd.Flags().BoolVar(&force, "force", false, "promote even if the copy is further behind than the volume's max lag")
	return cmd
}

func newVolumeMoveCmd(g *globals) *cobra.Command {
	var to string
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "move NAME --to NODE",
		Short: "Hand a volume to one of its replicas with zero loss (planned move)",
		Long: `Move the primary of a volume to one of its replicas: once the volume is quiet
and the target holds its newest batch, ownership moves in the next epoch, with
nothing lost. Stop the containers writing to the volume first: the move waits
up to --wait for the volume to go quiet, and explains what it waits for.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return fmt.Errorf("--to NODE is required")
			}
			if wait <= 0 {
				return fmt.Errorf("--wait must be positive")
			}
			if g.timeout < wait+5*time.Second {
				g.timeout = wait + 5*time.Second
			}
			return g.client(cmd, func(ctx context.Context, c tetherpb.ControlClient) error {
				resp, err := c.VolumeMove(ctx, &tetherpb.VolumeMoveRequest{Name: args[0], To: to, WaitMs: wait.Milliseconds()})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(stdout(cmd), resp)
				}
				fmt.Fprintf(stdout(cmd), "Moved %s to %s in %s: epoch %d, replicas %s\n", resp.Volume.Name, resp.Volume.Primary,
					time.Duration(resp.TookMs)*time.Millisecond, resp.Volume.Epoch, strings.Join(resp.Volume.ReplicaNodes, ", "))
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "the replica to move the volume to")
	cmd.Flags().DurationVar(&wait, "wait", 30*time.Second, "how long to wait for the volume to go quiet")
	return cmd
}

func newVolumeUpdateCmd(g *globals) *cobra.Command {
	var replicas uint32
	var maxLag time.Duration
	var placement map[string]string
	var clearPlacement, freeze bool
	cmd := &cobra.Command{
		Use:   "update NAME",
		Short: "Change a volume's copy count, max lag or placement",
		Long: `Change a volume's options. The leader then adds copies on spare nodes, drops
extra ones (the furthest behind first), or moves copies off nodes that no longer
match the placement: a new copy is filled before the old one is dropped.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &tetherpb.VolumeUpdateRequest{Name: args[0]}
			f := cmd.Flags()
			if f.Changed("replicas") {
				if replicas == 0 {
					return fmt.Errorf("--replicas must be at least 1 (it counts the primary)")
				}
				req.Replicas = &replicas
			}
			if f.Changed("max-lag") {
				if maxLag < 0 {
					return fmt.Errorf("--max-lag must not be negative (0 means no limit)")
				}
				ms := maxLag.Milliseconds()
				if maxLag == 0 {
					ms = -1
				}
				req.MaxLagMs = &ms
			}
			if f.Changed("placement") && clearPlacement {
				return fmt.Errorf("--placement and --clear-placement exclude each other")
			}
			if f.Changed("freeze") {
				req.Freeze = &freeze
			}
			if f.Changed("placement") || clearPlacement {
				req.SetPlacement, req.Placement = true, placement
			}
			return g.client(cmd, func(ctx context.Context, c tetherpb.ControlClient) error {
				resp, err := c.VolumeUpdate(ctx, req)
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(stdout(cmd), resp.Volume)
				}
				fmt.Fprintf(stdout(cmd), "Updated %s; the leader adjusts its copies to match (see tether volume inspect %s)\n", resp.Volume.Name, resp.Volume.Name)
				return nil
			})
		},
	}
	cmd.Flags().Uint32Var(&replicas, "replicas", 0, "number of copies, counting the primary")
	cmd.Flags().DurationVar(&maxLag, "max-lag", 0, "automatic failover refuses a copy further behind than this (0: no limit)")
	cmd.Flags().StringToStringVar(&placement, "placement", nil, "only nodes with this label hold copies, KEY=VALUE (repeatable)")
	cmd.Flags().BoolVar(&clearPlacement, "clear-placement", false, "remove the placement constraint")
	cmd.Flags().BoolVar(&freeze, "freeze", false, "pause the volume's containers briefly when a point-in-time cut needs it (--freeze=false to stop)")
	return cmd
}

// fullSync shows the progress of a whole tree being sent to a replica:
// "-" when none is.
func fullSync(done, total int64) string {
	if t := replication.FullSyncText(done, total); t != "" {
		return t
	}
	return "-"
}
