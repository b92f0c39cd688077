// Package demo runs tether's demonstration: three real agent processes on
// loopback, a replicated volume, the loss of its primary and the failover,
// told as a short narrative.
package demo
