package agent

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics exposes the agent's state to Prometheus. It reads the live state
// at scrape time (a Collector), so nothing has to keep gauges in step; the
// only stored values are counters of events.
type metrics struct {
	a        *Agent
	registry *prometheus.Registry

	fencings prometheus.Counter

	lag, lagBytes, pendingCuts, connected, acked, epoch, primary, leaseHeld, isLeader, members *prometheus.Desc
	cutFailing, fullSyncLeft, cuts, fileOnlyCuts, fullStreams                                  *prometheus.Desc
	recreated, missingImage, containerProblems                                                 *prometheus.Desc
}

func newMetrics(a *Agent) *metrics {
	m := &metrics{
		a:        a,
		registry: prometheus.NewRegistry(),
		fencings: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_fencings_total",
			Help: "Times this node stopped serving a volume as primary because its lease lapsed.",
		}),
		lag: prometheus.NewDesc("tether_replica_lag_seconds",
			"Age of the oldest change the replica has not made durable (0 when caught up), seen by the primary.",
			[]string{"volume", "replica"}, nil),
		lagBytes: prometheus.NewDesc("tether_replica_lag_bytes",
			"Encoded bytes of the cuts taken and not yet durable on the replica, seen by the primary.",
			[]string{"volume", "replica"}, nil),
		pendingCuts: prometheus.NewDesc("tether_replica_pending_cuts",
			"Cuts taken and not yet durable on the replica (the first is in flight while it is connected).",
			[]string{"volume", "replica"}, nil),
		fullSyncLeft: prometheus.NewDesc("tether_replica_full_sync_remaining_bytes",
			"While the replica is sent the whole tree: encoded bytes of it not yet sent (0 otherwise).", []string{"volume", "replica"}, nil),
		connected: prometheus.NewDesc("tether_replica_connected",
			"1 when the primary's stream to the replica is up.", []string{"volume", "replica"}, nil),
		acked: prometheus.NewDesc("tether_replica_acked_batch",
			"Sequence number of the last batch the replica made durable.", []string{"volume", "replica"}, nil),
		epoch: prometheus.NewDesc("tether_volume_epoch",
			"The volume's epoch in this node's catalog.", []string{"volume"}, nil),
		primary: prometheus.NewDesc("tether_volume_primary",
			"1 when this node serves the volume as primary.", []string{"volume"}, nil),
		cutFailing: prometheus.NewDesc("tether_volume_cut_failing",
			"1 when this node serves the volume as primary and its last cut failed (tether volume inspect says why).", []string{"volume"}, nil),
		cuts: prometheus.NewDesc("tether_volume_cuts_total",
			"Cuts this node took of the volume as its primary (since it became primary).", []string{"volume"}, nil),
		fileOnlyCuts: prometheus.NewDesc("tether_volume_file_consistent_only_cuts_total",
			"Of those, the cuts that are not crash-consistent (the volume never went quiet and no freeze hook helped).", []string{"volume"}, nil),
		fullStreams: prometheus.NewDesc("tether_volume_changed_full_streams_total",
			"Full cuts whose streamed files changed while sent: continued over the cuts taken meanwhile, or spooled again (outcome).",
			[]string{"volume", "outcome"}, nil),
		leaseHeld: prometheus.NewDesc("tether_lease_held",
			"1 when this node holds a primary lease.", nil, nil),
		isLeader: prometheus.NewDesc("tether_raft_leader",
			"1 when this node is the Raft leader.", nil, nil),
		members: prometheus.NewDesc("tether_members",
			"Cluster members by health, as this node sees them.", []string{"health"}, nil),
		recreated: prometheus.NewDesc("tether_containers_recreated_total",
			"Standalone containers (label tether.failover=true) this node created again after their host died.", nil, nil),
		missingImage: prometheus.NewDesc("tether_container_recreate_missing_image_total",
			"Times this node found a container to re-create whose image it does not have.", nil, nil),
		containerProblems: prometheus.NewDesc("tether_container_recreate_problems",
			"Containers this node should re-create and cannot right now (see tether status).", nil, nil),
	}
	m.registry.MustRegister(m, m.fencings,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{})
}

// Describe implements prometheus.Collector.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{m.lag, m.lagBytes, m.pendingCuts, m.connected, m.acked, m.epoch, m.primary, m.cutFailing, m.fullSyncLeft, m.cuts, m.fileOnlyCuts, m.fullStreams, m.leaseHeld, m.isLeader, m.members, m.recreated, m.missingImage, m.containerProblems} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	a := m.a
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, v := range a.cluster.Volumes() {
		if v.Primary != a.cfg.NodeName && !contains(v.ReplicaNodes, a.cfg.NodeName) {
			continue
		}
		gauge(m.epoch, float64(v.Epoch), v.Name)
		st, serving := a.primaryStatus(v.Name)
		gauge(m.primary, b2f(serving), v.Name)
		if serving {
			gauge(m.cutFailing, b2f(st.CutError != ""), v.Name)
			counter := func(d *prometheus.Desc, n uint64, labels ...string) {
				ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(n), labels...)
			}
			counter(m.cuts, st.Cuts, v.Name)
			counter(m.fileOnlyCuts, st.FileConsistentOnlyCuts, v.Name)
			counter(m.fullStreams, st.StreamsContinued, v.Name, "continued")
			counter(m.fullStreams, st.StreamsBroken, v.Name, "spooled")
		}
		for _, r := range st.Replicas {
			gauge(m.lag, r.Lag.Seconds(), v.Name, r.Node)
			gauge(m.lagBytes, float64(r.LagBytes), v.Name, r.Node)
			gauge(m.pendingCuts, float64(r.PendingCuts), v.Name, r.Node)
			gauge(m.fullSyncLeft, float64(max(0, r.FullSyncTotal-r.FullSyncDone)), v.Name, r.Node)
			gauge(m.connected, b2f(r.Connected), v.Name, r.Node)
			gauge(m.acked, float64(r.AckedSeq), v.Name, r.Node)
		}
	}
	gauge(m.leaseHeld, b2f(a.lease.valid()))
	gauge(m.isLeader, b2f(a.cluster.IsLeader()))
	counts := map[string]int{}
	for _, mem := range a.cluster.Members() {
		counts[mem.Health]++
	}
	for _, h := range sortedKeys(counts) {
		gauge(m.members, float64(counts[h]), h)
	}
	if a.keeper != nil {
		problems, created, missing := a.keeper.status()
		ch <- prometheus.MustNewConstMetric(m.recreated, prometheus.CounterValue, float64(created))
		ch <- prometheus.MustNewConstMetric(m.missingImage, prometheus.CounterValue, float64(missing))
		gauge(m.containerProblems, float64(len(problems)))
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
