package main

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/tether-io/tether/proto/tetherpb"
)

func newMembersCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "members",
		Short: "List the cluster's members with their health and Raft role",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.client(cmd, func(ctx context.Context, c tetherpb.ControlClient) error {
				resp, err := c.Members(ctx, &tetherpb.MembersRequest{})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(stdout(cmd), resp)
				}
				w := table(stdout(cmd))
				fmt.Fprintln(w, "NAME\tGOSSIP\tRPC\tHEALTH\tRAFT\tVERSION\tLABELS")
				for _, m := range resp.Members {
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.Name, m.GossipAddr, m.RpcAddr, m.Health, m.RaftRole, m.Version, labelString(m.Labels))
				}
				return w.Flush()
			})
		},
	}
}

func newStatusCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show this agent's state: Raft, and the volumes it serves",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.client(cmd, func(ctx context.Context, c tetherpb.ControlClient) error {
				resp, err := c.Status(ctx, &tetherpb.StatusRequest{})
				if err != nil {
					return err
				}
				if g.json {
					return printJSON(stdout(cmd), resp)
				}
				w := table(stdout(cmd))
				leader := resp.Leader
				if leader == "" {
					leader = "(none known)"
				}
				fmt.Fprintf(w, "Node:\t%s\n", resp.Node)
				fmt.Fprintf(w, "Version:\t%s\n", resp.Version)
				fmt.Fprintf(w, "Data dir:\t%s\n", resp.DataDir)
				fmt.Fprintf(w, "Raft:\t%s, term %d, last index %d, leader %s\n", resp.RaftState, resp.RaftTerm, resp.RaftLastIndex, leader)
				fmt.Fprintf(w, "Security:\t%s\n", securityLine(resp.Security))
				if je := resp.GetSecurity().GetJoinError(); je != "" {
					fmt.Fprintf(w, "Gossip join:\t%s\n", je)
				}
				lease := fmt.Sprintf("held (confirmed %s ago)", (time.Duration(resp.LeaseAgeMs) * time.Millisecond).Round(time.Millisecond))
				if !resp.LeaseHeld {
					lease = "NOT held: this node serves no volume as primary"
				}
				fmt.Fprintf(w, "Primary lease:\t%s\n", lease)
				for _, f := range resp.Fenced {
					fmt.Fprintf(w, "FENCED:\t%s (epoch %d) since %s: %s\n", f.Name, f.Epoch, time.Unix(0, f.SinceUnixNano).UTC().Format(time.RFC3339), f.Reason)
				}
				for _, q := range resp.Quarantined {
					fmt.Fprintf(w, "QUARANTINED:\t%s: %d file(s) written as primary in epoch %d, set aside %s in %s\n", q.Volume, q.Files, q.Epoch, time.Unix(0, q.TimeUnixNano).UTC().Format(time.RFC3339), q.Dir)
				}
				for _, c := range resp.ContainerProblems {
					fmt.Fprintf(w, "NOT RE-CREATED:\t%s: %s\n", c.Container, c.Problem)
				}
				fmt.Fprintf(w, "Replica of:\t%s\n", orNone(strings.Join(resp.ReplicaOf, ", ")))
				if len(resp.PrimaryOf) == 0 {
					fmt.Fprintf(w, "Primary of:\t(none)\n")
				}
				if err := w.Flush(); err != nil {
					return err
				}
				for _, vs := range resp.PrimaryOf {
					fmt.Fprintf(stdout(cmd), "\nPrimary of %s (epoch %d, batch %d):\n", vs.Name, vs.Epoch, vs.Seq)
					if err := printReplicaTable(stdout(cmd), vs); err != nil {
						return err
					}
				}
				return nil
			})
		},
	}
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

// labelString prints labels as k=v,k=v in key order.
func labelString(labels map[string]string) string {
	keys := make([]string, 0, len(labels))
	for k := range labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, k+"="+labels[k])
	}
	return orNone(strings.Join(parts, ","))
}
