package main

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/tether-io/tether/proto/tetherpb"
)

func fmtTime(unixNano int64) string {
	return time.Unix(0, unixNano).UTC().Format(time.RFC3339)
}

func newVolumeRmCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "rm NAME",
		Aliases: []string{"remove"},
		Short:   "Delete a volume; it is kept for the retention period (tether volume undelete brings it back)",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.client(cmd, func(ctx context.Context, c tetherpb.ControlClient) error {
				resp, err := c.VolumeRemove(ctx, &tetherpb.VolumeRemoveRequest{Name: args[0]})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(stdout(cmd), resp.Volume)
				}
				fmt.Fprintf(stdout(cmd), "Deleted volume %s; it is kept until %s (tether volume undelete %s brings it back)\n",
					args[0], fmtTime(resp.Volume.PurgeAfterUnixNano), args[0])
				return nil
			})
		},
	}
}

func newVolumeUndeleteCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "undelete NAME",
		Short: "Bring back a deleted volume before its retention period ends",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.client(cmd, func(ctx context.Context, c tetherpb.ControlClient) error {
				resp, err := c.VolumeUndelete(ctx, &tetherpb.VolumeUndeleteRequest{Name: args[0]})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(stdout(cmd), resp.Volume)
				}
				fmt.Fprintf(stdout(cmd), "Volume %s is back: primary %s, epoch %d\n", args[0], resp.Volume.Primary, resp.Volume.Epoch)
				return nil
			})
		},
	}
}

func newVolumePurgeCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "purge NAME",
		Short: "Discard a deleted volume now instead of at the end of its retention period",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.client(cmd, func(ctx context.Context, c tetherpb.ControlClient) error {
				if _, err := c.VolumePurge(ctx, &tetherpb.VolumePurgeRequest{Name: args[0]}); err != nil {
					return err
				}
				if g.json {
					return printJSON(stdout(cmd), &tetherpb.VolumePurgeResponse{})
				}
				fmt.Fprintf(stdout(cmd), "Purged volume %s from the catalog\n", args[0])
				return nil
			})
		},
	}
}
