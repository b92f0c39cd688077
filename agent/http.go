package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"
)

// startHTTP serves the local HTTP endpoints: /healthz, /v1/status and
// /metrics (Prometheus).
func (a *Agent) startHTTP() error {
	if a.cfg.HTTPAddr == "" {
		return nil
	}
	ln, err := net.Listen("tcp", a.cfg.HTTPAddr)
	if err != nil {
		return fmt.Errorf("listening for HTTP on %s: %w", a.cfg.HTTPAddr, err)
	}
	a.httpLn = ln
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", a.handleHealth)
	mux.HandleFunc("GET /v1/status", a.handleStatus)
	mux.Handle("GET /metrics", a.metrics.handler())
	a.httpSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		if err := a.httpSrv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Warn("http server stopped", "err", err)
		}
	}()
	return nil
}

// handleHealth answers 200 once this agent knows a Raft leader, 503 before.
func (a *Agent) handleHealth(w http.ResponseWriter, _ *http.Request) {
	leader, _ := a.cluster.Leader()
	if leader == "" {
		http.Error(w, "no raft leader known yet", http.StatusServiceUnavailable)
		return
	}
	fmt.Fprintf(w, "ok (leader %s)\n", leader)
}

func (a *Agent) handleStatus(w http.ResponseWriter, r *http.Request) {
	st, err := (&controlServer{a: a}).Status(r.Context(), nil)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(st)
}
