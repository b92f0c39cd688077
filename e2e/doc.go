// Package e2e runs tether on the real Docker Engine: each simulated host is
// a FROM-scratch container holding the static tether binary, on its own
// user-defined network, and faults are injected by killing, pausing or
// disconnecting those containers. The tests run only when TETHER_E2E=1
// (make e2e); see README.md for what this engine can and cannot show.
package e2e
