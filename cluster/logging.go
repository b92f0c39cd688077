package cluster

import (
	"bytes"
	"context"
	"io"
	"log"
	"log/slog"
	"strings"
	"sync/atomic"

	"github.com/hashicorp/go-hclog"
)

// levelTrace is below slog's Debug: hashicorp trace and memberlist debug
// chatter go there, so a Debug handler still drops it.
const levelTrace = slog.LevelDebug - 4

// hclogAdapter routes a hashicorp hclog.Logger into slog. Raft's Debug and
// Trace chatter is dropped unless SetLevel lowers the floor (Info default).
type hclogAdapter struct {
	l     *slog.Logger
	name  string
	args  []any
	floor *atomic.Int32 // hclog.Level
}

var _ hclog.Logger = (*hclogAdapter)(nil)

func newHCLog(l *slog.Logger, name string) *hclogAdapter {
	floor := &atomic.Int32{}
	floor.Store(int32(hclog.Info))
	return &hclogAdapter{l: l, name: name, floor: floor}
}

func slogLevel(level hclog.Level) slog.Level {
	switch {
	case level == hclog.NoLevel:
		return slog.LevelInfo
	case level <= hclog.Trace:
		return levelTrace
	case level == hclog.Debug:
		return slog.LevelDebug
	case level == hclog.Info:
		return slog.LevelInfo
	case level == hclog.Warn:
		return slog.LevelWarn
	default:
		return slog.LevelError
	}
}

func (a *hclogAdapter) enabled(level hclog.Level) bool {
	if level == hclog.NoLevel {
		level = hclog.Info
	}
	return level >= hclog.Level(a.floor.Load()) && a.l.Enabled(context.Background(), slogLevel(level))
}

func (a *hclogAdapter) Log(level hclog.Level, msg string, args ...any) {
	if level == hclog.Off || !a.enabled(level) {
		return
	}
	all := make([]any, 0, len(a.args)+len(args)+2)
	if a.name != "" {
		all = append(all, "component", a.name)
	}
	all = append(all, a.args...)
	all = append(all, args...)
	a.l.Log(context.Background(), slogLevel(level), msg, all...)
}

func (a *hclogAdapter) Trace(msg string, args ...any) { a.Log(hclog.Trace, msg, args...) }
func (a *hclogAdapter) Debug(msg string, args ...any) { a.Log(hclog.Debug, msg, args...) }
func (a *hclogAdapter) Info(msg string, args ...any)  { a.Log(hclog.Info, msg, args...) }
func (a *hclogAdapter) Warn(msg string, args ...any)  { a.Log(hclog.Warn, msg, args...) }
func (a *hclogAdapter) Error(msg string, args ...any) { a.Log(hclog.Error, msg, args...) }
func (a *hclogAdapter) IsTrace() bool                 { return a.enabled(hclog.Trace) }
func (a *hclogAdapter) IsDebug() bool                 { return a.enabled(hclog.Debug) }
func (a *hclogAdapter) IsInfo() bool                  { return a.enabled(hclog.Info) }
func (a *hclogAdapter) IsWarn() bool                  { return a.enabled(hclog.Warn) }
func (a *hclogAdapter) IsError() bool                 { return a.enabled(hclog.Error) }
func (a *hclogAdapter) ImpliedArgs() []any            { return a.args }
func (a *hclogAdapter) Name() string                  { return a.name }
func (a *hclogAdapter) SetLevel(level hclog.Level)    { a.floor.Store(int32(level)) }
func (a *hclogAdapter) GetLevel() hclog.Level         { return hclog.Level(a.floor.Load()) }

func (a *hclogAdapter) With(args ...any) hclog.Logger {
	c := *a
	c.args = append(append([]any(nil), a.args...), args...)
	return &c
}

func (a *hclogAdapter) Named(name string) hclog.Logger {
	c := *a
	if c.name != "" {
		c.name += "." + name
	} else {
		c.name = name
	}
	return &c
}

func (a *hclogAdapter) ResetNamed(name string) hclog.Logger {
	c := *a
	c.name = name
	return &c
}

func (a *hclogAdapter) StandardLogger(opts *hclog.StandardLoggerOptions) *log.Logger {
	return log.New(a.StandardWriter(opts), "", 0)
}

func (a *hclogAdapter) StandardWriter(*hclog.StandardLoggerOptions) io.Writer {
	attrs := a.args
	if a.name != "" {
		attrs = append([]any{"component", a.name}, attrs...)
	}
	return &levelWriter{l: a.l.With(attrs...)}
}

// levelWriter turns lines of a standard logger ("[WARN] memberlist: ...")
// into slog records, taking the level from the bracketed prefix. Debug
// lines go to levelTrace: memberlist logs every probe at debug.
type levelWriter struct {
	l *slog.Logger
}

func (w *levelWriter) Write(p []byte) (int, error) {
	for _, line := range bytes.Split(bytes.TrimRight(p, "\n"), []byte("\n")) {
		text := strings.TrimSpace(string(line))
		if text == "" {
			continue
		}
		level, msg := lineLevel(text)
		w.l.Log(context.Background(), level, msg)
	}
	return len(p), nil
}

// lineLevel splits a "[LEVEL] message" line; lines without a known
// prefix are Info.
func lineLevel(line string) (slog.Level, string) {
	if !strings.HasPrefix(line, "[") {
		return slog.LevelInfo, line
	}
	tag, rest, ok := strings.Cut(line[1:], "]")
	if !ok {
		return slog.LevelInfo, line
	}
	rest = strings.TrimSpace(rest)
	switch tag {
	case "TRACE", "DEBUG":
		return levelTrace, rest
	case "INFO":
		return slog.LevelInfo, rest
	case "WARN":
		return slog.LevelWarn, rest
	case "ERR", "ERROR":
		return slog.LevelError, rest
	}
	return slog.LevelInfo, line
}
