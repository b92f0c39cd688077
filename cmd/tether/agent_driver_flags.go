package main

import (
	"log/slog"
	"time"

	"github.com/spf13/pflag"

	"github.com/tether-io/tether/agent"
	"github.com/tether-io/tether/cluster"
)

// driverFlags are the agent's Docker volume driver flags.
type driverFlags struct {
	socket    string
	name      string
	retention time.Duration
}

func addDriverFlags(f *pflag.FlagSet) *driverFlags {
	d := &driverFlags{}
	f.StringVar(&d.socket, "driver-socket", agent.DriverSocketAuto,
		`unix socket of the Docker volume driver; its file name is the driver's name. "auto": `+agent.DefaultDriverSocket+
			` when running as root and `+agent.DockerPluginDir+` exists, else off; "": off`)
	f.StringVar(&d.name, "driver-name", "",
		`the name Docker knows the driver by, when it is not the socket's file name: a managed plugin's name with its tag, e.g. tether:latest (make plugin sets it)`)
	f.DurationVar(&d.retention, "volume-retention", cluster.DefaultRetention,
		"how long a removed volume (docker volume rm, tether volume rm) is kept for tether volume undelete before it is purged")
	return d
}

// apply resolves the flags into cfg and says what the driver will do.
func (d *driverFlags) apply(cfg *agent.Config, logger *slog.Logger) {
	path, why := agent.DefaultDriverSocketFor(d.socket)
	cfg.DriverSocket = path
	cfg.DriverName = d.name
	cfg.VolumeRetention = d.retention
	logger.Info(why, "socket", path)
}
