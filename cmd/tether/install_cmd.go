package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/tether-io/tether/deploy"
)

func newInstallCmd() *cobra.Command {
	var root, args string
	var force bool
	cmd := &cobra.Command{
		Use:   "install",
		Short: "Install the systemd unit (and /etc/default/tether with this host's agent flags)",
		Long: `Write /etc/systemd/system/tether.service (ordered before docker.service, so the
volume driver's socket exists when dockerd restores containers at boot) and, if it does
not exist yet, /etc/default/tether holding the agent flags given with --args. The binary
is expected at /usr/local/bin/tether. Existing files are kept unless --force.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out := cmd.OutOrStdout()
			unit := filepath.Join(root, "etc/systemd/system/tether.service")
			if err := writeIfAbsent(unit, deploy.SystemdUnit, 0o644, force); err != nil {
				return err
			}
			fmt.Fprintf(out, "wrote %s\n", unit)
			def := filepath.Join(root, "etc/default/tether")
			content := "# Flags of this host's tether agent (see tether agent --help and README.md).\nTETHER_ARGS=\"" + strings.ReplaceAll(args, `"`, `\"`) + "\"\n"
			switch err := writeIfAbsent(def, content, 0o600, false); {
			case err == nil:
				fmt.Fprintf(out, "wrote %s\n", def)
			case errors.Is(err, fs.ErrExist):
				fmt.Fprintf(out, "kept %s (already there)\n", def)
			default:
				return err
			}
			fmt.Fprintln(out, "next: systemctl daemon-reload && systemctl enable --now tether")
			return nil
		},
	}
	cmd.Flags().StringVar(&root, "root", "/", "install under this directory instead of /")
	cmd.Flags().StringVar(&args, "args", "", `the agent flags for /etc/default/tether, e.g. "--node-name h1 --join 10.0.0.12 --bootstrap-expect 3 ..."`)
	cmd.Flags().BoolVar(&force, "force", false, "overwrite an existing unit file")
	return cmd
}

// writeIfAbsent writes content to path (creating its directory) unless the
// file exists and force is false, in which case the error wraps
// fs.ErrExist.
func writeIfAbsent(path, content string, mode os.FileMode, force bool) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", filepath.Dir(path), err)
	}
	flags := os.O_WRONLY | os.O_CREATE | os.O_EXCL
	if force {
		flags = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
	}
	f, err := os.OpenFile(path, flags, mode)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%s exists (use --force to overwrite): %w", path, err)
		}
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if _, err := f.WriteString(content); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return f.Close()
}
