package main

import (
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/tether-io/tether/internal/demo"
)

func newDemoCmd() *cobra.Command {
	opt := demo.Options{}
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run a three-node cluster on this machine, replicate a volume and survive a failover",
		Long: `Start three tether agents on loopback ports in a temporary directory (no root, no
setup), create a volume with three copies, write files on its primary and watch them
arrive on the replicas, kill the primary, watch a replica take over in a new epoch,
and keep replicating. Prints what happens and cleans up.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			exe, err := os.Executable()
			if err != nil {
				return fmt.Errorf("finding the tether binary to start agents from: %w", err)
			}
			opt.Exe = exe
			opt.Out = cmd.OutOrStdout()
			return demo.Run(cmd.Context(), opt)
		},
	}
	cmd.Flags().BoolVar(&opt.Keep, "keep", false, "leave the surviving agents running for exploration")
	cmd.Flags().StringVar(&opt.Dir, "dir", "", "directory for the agents' data (default: a new temporary directory)")
	cmd.Flags().DurationVar(&opt.Timeout, "step-timeout", 60*time.Second, "give up on a step after this long")
	return cmd
}
