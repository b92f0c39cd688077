// Command sqlwork is the stateful workload of the e2e suite: it commits
// numbered transactions on a SQLite database (pure Go, modernc.org/sqlite)
// and prints each acknowledged number, or verifies a copy of that database
// after a failover.
//
//	sqlwork run    [--db /data/db.sqlite] [--count N] [--interval 5ms] [--journal wal|delete]
//	sqlwork verify [--db /data/db.sqlite]
//
// run prints one line per transaction to stdout:
//
//	ack N UNIX_NANO     COMMIT of row N returned (acknowledged) at that time
//	fail N ERROR        the transaction failed (the row may or may not exist)
//
// A transaction that was started but neither acked nor failed when the
// process died is indeterminate. verify opens the database (running
// SQLite's own recovery), runs PRAGMA integrity_check and prints one JSON
// object: {"integrity":"ok","rows":R,"min":A,"max":B,"gaps":[[from,to],...]}.
//
// Journal (--journal wal, the default): WAL with automatic checkpoints off, so after the database is
// created the main file never changes and every commit only appends frames
// to db.sqlite-wal. A copy taken file by file at any moment is then a prefix
// of the WAL (SQLite's recovery stops at the last checksummed commit frame)
// beside the unchanged main file: crash-consistent even without
// point-in-time cuts. The -shm index is rebuilt by recovery.
package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	_ "modernc.org/sqlite"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: sqlwork run|verify [flags]")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "run":
		err = runCmd(ctx, os.Args[2:])
	case "verify":
		err = verifyCmd(ctx, os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q: want run or verify", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "sqlwork:", err)
		os.Exit(1)
	}
}

func open(path string) (*sql.DB, error) {
	// One connection: the pragmas below are per connection.
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(5000)")
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	db.SetMaxOpenConns(1)
	return db, nil
}

func runCmd(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	path := fs.String("db", "/data/db.sqlite", "database file")
	count := fs.Int("count", 0, "stop after this many transactions (0: run until killed)")
	interval := fs.Duration("interval", 5*time.Millisecond, "pause between transactions")
	journal := fs.String("journal", "wal", "wal (append-only WAL, no checkpoints) or delete (rollback journal)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	pragmas, ok := journalPragmas(*journal)
	if !ok {
		return fmt.Errorf("--journal %q: want wal or delete", *journal)
	}
	db, err := open(*path)
	if err != nil {
		return err
	}
	defer db.Close()
	for _, p := range append(pragmas,
		"CREATE TABLE IF NOT EXISTS tx (n INTEGER PRIMARY KEY, at INTEGER NOT NULL, pad TEXT NOT NULL)") {
		if _, err := db.ExecContext(ctx, p); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
	}
	var last sql.NullInt64
	if err := db.QueryRowContext(ctx, "SELECT max(n) FROM tx").Scan(&last); err != nil {
		return fmt.Errorf("reading the last row: %w", err)
	}
	out := lineWriter{}
	for n := last.Int64 + 1; *count == 0 || n <= last.Int64+int64(*count); n++ {
		if ctx.Err() != nil {
			return nil
		}
		if err := commit(ctx, db, n); err != nil {
			out.printf("fail %d %v\n", n, err)
		} else {
			out.printf("ack %d %d\n", n, time.Now().UnixNano())
		}
		if *interval > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(*interval):
			}
		}
	}
	return nil
}

// journalPragmas returns the pragmas of a --journal mode.
func journalPragmas(mode string) ([]string, bool) {
	switch mode {
	case "wal":
		return []string{
			"PRAGMA page_size=1024", // small pages: small WAL frames to replicate
			"PRAGMA journal_mode=WAL",
			"PRAGMA wal_autocheckpoint=0", // the main file never changes after creation
			"PRAGMA synchronous=FULL",     // fsync the WAL at every commit
		}, true
	case "delete":
		// The main file is rewritten in place at every commit: a copy is
		// consistent only if main file and journal are taken at one moment.
		return []string{"PRAGMA page_size=1024", "PRAGMA journal_mode=DELETE", "PRAGMA synchronous=FULL"}, true
	}
	return nil, false
}

// commit inserts row n in its own transaction.
func commit(ctx context.Context, db *sql.DB, n int64) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, "INSERT INTO tx (n, at, pad) VALUES (?, ?, ?)", n, time.Now().UnixNano(), fmt.Sprintf("%0100d", n)); err != nil {
		return errors.Join(err, tx.Rollback())
	}
	return tx.Commit()
}

// lineWriter writes each line with one write(2), so a kill never leaves
// half a line behind a whole one.
type lineWriter struct{}

func (lineWriter) printf(format string, a ...any) {
	_, _ = os.Stdout.Write(fmt.Appendf(nil, format, a...))
}

type verifyResult struct {
	Integrity string     `json:"integrity"`
	Rows      int64      `json:"rows"`
	Min       int64      `json:"min"`
	Max       int64      `json:"max"`
	Gaps      [][2]int64 `json:"gaps"`
}

func verifyCmd(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	path := fs.String("db", "/data/db.sqlite", "database file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if _, err := os.Stat(*path); err != nil {
		return fmt.Errorf("the database is missing: %w", err)
	}
	db, err := open(*path)
	if err != nil {
		return err
	}
	defer db.Close()
	var res verifyResult
	if err := db.QueryRowContext(ctx, "PRAGMA integrity_check").Scan(&res.Integrity); err != nil {
		return fmt.Errorf("integrity check: %w", err)
	}
	rows, err := db.QueryContext(ctx, "SELECT n FROM tx ORDER BY n")
	if err != nil {
		return fmt.Errorf("reading rows: %w", err)
	}
	defer rows.Close()
	var prev int64
	for rows.Next() {
		var n int64
		if err := rows.Scan(&n); err != nil {
			return fmt.Errorf("reading rows: %w", err)
		}
		if res.Rows == 0 {
			res.Min = n
		} else if n > prev+1 {
			res.Gaps = append(res.Gaps, [2]int64{prev + 1, n - 1})
		}
		res.Rows++
		res.Max, prev = n, n
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("reading rows: %w", err)
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}
