package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/moby/moby/client"
	"github.com/spf13/cobra"

	"github.com/tether-io/tether/proto/tetherpb"
)

// shadow is a Docker volume of another driver that has a tether volume's
// name: a container that named the volume without a driver while tether's
// driver was unreachable got this copy instead (dockerd falls back to the
// local driver silently).
type shadow struct {
	Name       string   `json:"name"`
	Driver     string   `json:"driver"`
	Mountpoint string   `json:"mountpoint"`
	CreatedAt  string   `json:"created_at,omitempty"`
	Containers []string `json:"containers"`
}

type doctorReport struct {
	TetherVolumes int      `json:"tether_volumes"`
	Shadows       []shadow `json:"shadows"`
}

// dockerVolume is what findShadows needs of a Docker volume.
type dockerVolume struct {
	Name, Driver, Mountpoint, CreatedAt string
}

// findShadows is a pure function: the Docker volumes whose name is a
// (not deleted) tether volume's and whose driver is not tether's.
func findShadows(tetherVols []*tetherpb.Volume, dockerVols []dockerVolume, driver string) []shadow {
	ours := map[string]bool{}
	for _, v := range tetherVols {
		if v.DeletedUnixNano == 0 {
			ours[v.Name] = true
		}
	}
	out := []shadow{}
	for _, dv := range dockerVols {
		if ours[dv.Name] && dv.Driver != driver {
			out = append(out, shadow{Name: dv.Name, Driver: dv.Driver, Mountpoint: dv.Mountpoint, CreatedAt: dv.CreatedAt, Containers: []string{}})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func newDoctorCmd(g *globals) *cobra.Command {
	var driver string
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Look for problems between tether and Docker on this host (shadow volumes)",
		Long: `Look for problems between tether and this host's Docker Engine.

Shadow volumes: when a container names a volume without a driver and tether's driver is
unreachable at that moment, Docker silently creates a volume of the local driver with the
same name; the container then writes to that local copy, which tether does not replicate.
doctor lists such volumes and the containers using them. It talks to the local agent and to
Docker (DOCKER_HOST, default unix:///var/run/docker.sock). Exit status 1 when it finds one.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var vols []*tetherpb.Volume
			err := g.client(cmd, func(ctx context.Context, c tetherpb.ControlClient) error {
				resp, err := c.VolumeList(ctx, &tetherpb.VolumeListRequest{})
				if err != nil {
					return err
				}
				vols = resp.Volumes
				return nil
			})
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
			defer cancel()
			shadows, err := dockerShadows(ctx, vols, driver)
			if err != nil {
				return err
			}
			rep := doctorReport{TetherVolumes: len(vols), Shadows: shadows}
			if err := printDoctor(stdout(cmd), rep, driver, g.json); err != nil {
				return err
			}
			if len(shadows) > 0 {
				return fmt.Errorf("%d shadow volume(s) found", len(shadows))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&driver, "driver", "tether", "tether's Docker volume driver name on this host (the plugin socket's file name)")
	return cmd
}

// dockerShadows asks Docker for local-driver volumes and the containers
// that use the shadows.
func dockerShadows(ctx context.Context, vols []*tetherpb.Volume, driver string) ([]shadow, error) {
	cli, err := client.New(client.FromEnv) // negotiates the API version (this engine: 1.41)
	if err != nil {
		return nil, fmt.Errorf("docker client: %w", err)
	}
	defer cli.Close()
	// Only the local driver: listing every driver would also wait for
	// legacy plugins that are gone (dockerd retries them ~15 s).
	res, err := cli.VolumeList(ctx, client.VolumeListOptions{Filters: make(client.Filters).Add("driver", "local")})
	if err != nil {
		return nil, fmt.Errorf("listing Docker volumes: %w", err)
	}
	var dvs []dockerVolume
	for _, v := range res.Items {
		dvs = append(dvs, dockerVolume{Name: v.Name, Driver: v.Driver, Mountpoint: v.Mountpoint, CreatedAt: v.CreatedAt})
	}
	shadows := findShadows(vols, dvs, driver)
	for i := range shadows {
		cl, err := cli.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: make(client.Filters).Add("volume", shadows[i].Name)})
		if err != nil {
			return nil, fmt.Errorf("listing containers using volume %s: %w", shadows[i].Name, err)
		}
		for _, c := range cl.Items {
			name := c.ID[:min(12, len(c.ID))]
			if len(c.Names) > 0 {
				name = strings.TrimPrefix(c.Names[0], "/")
			}
			shadows[i].Containers = append(shadows[i].Containers, name)
		}
	}
	return shadows, nil
}

func printDoctor(out io.Writer, rep doctorReport, driver string, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	if len(rep.Shadows) == 0 {
		fmt.Fprintf(out, "No shadow volumes: none of the %d tether volume names is used by a local Docker volume.\n", rep.TetherVolumes)
		return nil
	}
	for _, s := range rep.Shadows {
		fmt.Fprintf(out, "SHADOW VOLUME %s: Docker has a %q volume of that name at %s (created %s), used by containers: %s.\n",
			s.Name, s.Driver, s.Mountpoint, orNone(s.CreatedAt), orNone(strings.Join(s.Containers, ", ")))
		fmt.Fprintf(out, "  Writes there are not replicated by tether. Stop those containers, copy what they wrote into the tether volume\n"+
			"  if needed, run \"docker volume rm %s\", and name the driver when you start them again (--volume-driver %s,\n"+
			"  or driver: %s in compose).\n", s.Name, driver, driver)
	}
	return nil
}
