// Package unixsock prepares paths for unix sockets that a restarted
// process must reclaim: the agent's control socket and the Docker plugin
// socket.
package unixsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"time"
)

// RemoveStale removes a socket file left at path by a process that died,
// and refuses, naming what, when something still answers on it; advice
// tells the operator the way out.
func RemoveStale(path, what, advice string) error {
	if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("another process serves the %s %s: %s", what, path, advice)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("removing the stale %s %s: %w", what, path, err)
	}
	return nil
}
