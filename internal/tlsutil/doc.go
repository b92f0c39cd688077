// Package tlsutil is tether's mutual TLS: a small private PKI (a cluster CA
// and node certificates valid for both server and client authentication)
// and the tls.Configs the agent's RPC port uses for gRPC and Raft.
//
// Trust model: the cluster CA is the trust domain. A peer is accepted when
// its certificate chains to the CA and carries the right extended key usage
// (server auth when we dial it, client auth when it dials us); host names and
// IP SANs are written into node certificates but not required to match the
// dialed address, as in Consul's default (verify_server_hostname off), so a
// node keeps working when its address changes. Use a CA for tether only.
//
// The Store re-reads the CA, certificate and key files when they change on
// disk (checked at each new handshake), so certificates are rotated without
// a restart; connections already open keep their session.
package tlsutil
