package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/tether-io/tether/agent"
	"github.com/tether-io/tether/proto/tetherpb"
)

// globals are the flags every client command shares.
type globals struct {
	agentAddr string
	dataDir   string
	json      bool
	timeout   time.Duration
}

func newRootCmd() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:   "tether",
		Short: "tether keeps Docker volumes alive across hosts",
		Long: `tether replicates Docker volumes between hosts and fails them over when a host dies.

Run "tether agent" on every host; use the other commands to look at and manage the cluster
through the local agent. "tether demo" shows the whole thing on one machine.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       agent.Version,
	}
	pf := root.PersistentFlags()
	pf.StringVar(&g.agentAddr, "agent", "", "agent control address: a unix socket path or unix:///path (default: the socket in --data-dir)")
	pf.StringVar(&g.dataDir, "data-dir", agent.DefaultDataDir, "the agent's data directory (where its control socket lives)")
	pf.BoolVar(&g.json, "json", false, "print JSON instead of a table")
	pf.DurationVar(&g.timeout, "timeout", 15*time.Second, "how long to wait for the agent")
	root.AddCommand(newAgentCmd(g), newMembersCmd(g), newStatusCmd(g), newVolumeCmd(g), newDoctorCmd(g), newDemoCmd(), newInstallCmd(),
		newKeygenCmd(), newTLSCmd())
	return root
}

// target is the gRPC target for the control socket.
func (g *globals) target() string {
	a := g.agentAddr
	if a == "" {
		a = agent.SocketPath(g.dataDir)
	}
	if strings.HasPrefix(a, "unix://") || strings.HasPrefix(a, "unix:") {
		return a
	}
	return "unix://" + a
}

// client calls fn with a control client and a deadline.
func (g *globals) client(cmd *cobra.Command, fn func(context.Context, tetherpb.ControlClient) error) error {
	conn, err := grpc.NewClient(g.target(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("agent address %s: %w", g.target(), err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
	defer cancel()
	if err := fn(ctx, tetherpb.NewControlClient(conn)); err != nil {
		if ctx.Err() != nil || status.Code(err) == codes.Canceled || status.Code(err) == codes.DeadlineExceeded {
			return fmt.Errorf("the agent did not finish within --timeout %s (%s); the change may still be applied: check with tether volume inspect or tether status", g.timeout, status.Convert(err).Message())
		}
		return explain(err, g.target())
	}
	return nil
}

// explain turns a gRPC error into a sentence for the operator.
func explain(err error, target string) error {
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	msg := st.Message()
	if st.Code().String() == "Unavailable" {
		return fmt.Errorf("cannot reach the tether agent at %s (is it running? use --data-dir or --agent): %s", target, msg)
	}
	return fmt.Errorf("%s", msg)
}

func printJSON(w io.Writer, m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, Indent: "  ", EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, string(b))
	return err
}

func table(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
}

func stdout(cmd *cobra.Command) io.Writer {
	if cmd == nil {
		return os.Stdout
	}
	return cmd.OutOrStdout()
}
