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

// Listen reclaims path (see RemoveStale), listens on it and sets its mode.
func Listen(path string, mode os.FileMode, what, advice string) (net.Listener, error) {
	if err := RemoveStale(path, what, advice); err != nil {
		return nil, err
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listening on the %s %s: %w", what, path, err)
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("setting the mode of the %s %s: %w", what, path, err)
	}
	return ln, nil
}
