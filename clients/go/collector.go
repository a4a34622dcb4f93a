package pfclient

// Collector: the PandaFuzz bot's ResultCollector calls, delivering through pfcollector.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Defaults of CollectorOptions.
const (
	DefaultCollectorFuzzer = "pandafuzz-bot"
	DefaultStopTimeout     = 10 * time.Second
	DefaultStatusTimeout   = time.Second
	maxUnknownTypes        = 64 // distinct unknown type names counted by name (the rest as "(other)")
)

// CollectorOptions configure a Collector. Zero values mean the defaults.
type CollectorOptions struct {
	// SocketPath of the daemon; DefaultSocketPath() when empty.
	SocketPath string
	// Fuzzer names the bot in the hello (and in stats/lifecycle bodies at the master);
	// "pandafuzz-bot" when empty.
	Fuzzer string
	// JobID for events that carry none (FuzzerEvent.JobID empty); the Fuzzer name when empty.
	JobID string
	// Timeout bounds connecting, writes and control requests (default 5 s).
	Timeout time.Duration
	// CrashTimeout bounds HandleEvent for a crash: the wait for the daemon's durable
	// acknowledgement before the crash goes to the outbox (default: Timeout).
	CrashTimeout time.Duration
	// StopTimeout bounds Stop's wait for outstanding acknowledgements (default 10 s).
	StopTimeout time.Duration
	// StatusTimeout bounds GetStats' status request (default 1 s).
	StatusTimeout time.Duration
	// MaxPending and MaxPendingBytes bound events waiting for acknowledgement.
	MaxPending      int
	MaxPendingBytes int64
	// OutboxDir for crashes when the daemon cannot acknowledge them (see Options).
	OutboxDir string
	// Logf for the rare log lines; the standard logger when nil.
	Logf func(format string, args ...any)
}

// Collector replaces the bot's ResultCollector: the same calls, every event delivered
// through the local pfcollector daemon (durable, deduplicated, batched to the master).
// All methods are safe for concurrent use and never panic.
type Collector struct {
	client *Client
	opts   CollectorOptions

	mu         sync.Mutex
	started    bool
	stopped    bool
	handled    map[string]int64 // by bot event type
	failed     int64
	unknown    map[string]int64
	unknownN   int64
	progress   int64
	noInput    int64
	outboxed   int64
	lastStatus map[string]any
	statusErr  string
}

// NewCollector makes a collector; Start connects it.
func NewCollector(opts CollectorOptions) (*Collector, error) {
	if opts.Fuzzer == "" {
		opts.Fuzzer = DefaultCollectorFuzzer
	}
	if opts.JobID == "" {
		opts.JobID = opts.Fuzzer
	}
	if opts.StopTimeout <= 0 {
		opts.StopTimeout = DefaultStopTimeout
	}
	if opts.StatusTimeout <= 0 {
		opts.StatusTimeout = DefaultStatusTimeout
	}
	client, err := newClient(Options{
		SocketPath: opts.SocketPath, JobID: opts.JobID, Fuzzer: opts.Fuzzer,
		Timeout: opts.Timeout, CrashTimeout: opts.CrashTimeout, MaxPending: opts.MaxPending,
		MaxPendingBytes: opts.MaxPendingBytes, OutboxDir: opts.OutboxDir, Logf: opts.Logf,
	})
	if err != nil {
		return nil, err
	}
	return &Collector{client: client, opts: opts, handled: map[string]int64{}, unknown: map[string]int64{}}, nil
}

// Client is the low-level client underneath.
func (c *Collector) Client() *Client { return c.client }

// Start connects to the daemon (in the background: it returns at once, and a daemon that
// is not up yet is retried). ctx is accepted for the bot's signature; cancelling it does
// not drop anything: Stop flushes what is outstanding. Starting twice is an error.
func (c *Collector) Start(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.started {
		return errors.New("pfclient: collector already started")
	}
	if c.stopped {
		return ErrClosed
	}
	c.started = true
	c.client.Start()
	return nil
}

// HandleEvent delivers one bot event. Non-crash events are queued and it returns at once;
// a crash returns once the daemon has stored it durably, or after CrashTimeout once it is in
// the outbox (nil error in both cases: the crash is saved). An error means the event was
// not delivered (unknown type, refused by the daemon, queue full, stopped); it never panics.
func (c *Collector) HandleEvent(ev FuzzerEvent) (err error) {
	defer recoverTo(&err)
	c.mu.Lock()
	stopped := c.stopped
	c.mu.Unlock()
	if stopped {
		return errors.New("pfclient: collector is stopped")
	}
	mapped, merr := MapEvent(ev)
	switch {
	case errors.Is(merr, errUnknownType):
		c.mu.Lock()
		c.unknownN++
		typ := truncateChars(ev.Type, 64)
		name := typ
		if _, ok := c.unknown[name]; !ok && len(c.unknown) >= maxUnknownTypes {
			name = "(other)"
		}
		c.unknown[name]++
		c.mu.Unlock()
		return fmt.Errorf("pfclient: unknown event type %q: counted, not sent", typ)
	case errors.Is(merr, errProgress):
		c.count(&c.progress)
		return nil
	case errors.Is(merr, errNoInput):
		c.count(&c.noInput) // sent as an error event, below
	case merr != nil:
		c.count(&c.failed)
		return merr
	}
	if mapped.Kind == "crash" {
		_, err = c.client.Crash(mapped)
		if errors.Is(err, ErrOutboxed) {
			c.count(&c.outboxed)
			err = nil
		}
	} else {
		_, err = c.client.Send(mapped)
	}
	c.mu.Lock()
	if err != nil {
		c.failed++
	} else {
		c.handled[ev.Type]++
	}
	c.mu.Unlock()
	return err
}

func (c *Collector) count(n *int64) {
	c.mu.Lock()
	*n++
	c.mu.Unlock()
}

// Stop waits up to StopTimeout for every outstanding event to be acknowledged (not at all
// while the daemon is down), then closes the connection: crashes, corpus and lifecycle events
// still unacknowledged go to the outbox, and an error counts stats/coverage not delivered. Stopping twice, or before Start, is an error.
func (c *Collector) Stop() (err error) {
	defer recoverTo(&err)
	c.mu.Lock()
	if !c.started || c.stopped {
		c.mu.Unlock()
		return errors.New("pfclient: collector not started")
	}
	c.stopped = true
	c.mu.Unlock()
	ferr := c.client.Flush(c.opts.StopTimeout)
	cerr := c.client.Close()
	if cerr != nil {
		return cerr
	}
	var rej *RejectedError
	if errors.As(ferr, &rej) {
		return ferr // delivered otherwise; the first refusal nobody was told about
	}
	return nil
}

// GetStats returns the bot collector's keys, filled from the daemon's status (asked with a
// budget of StatusTimeout; the last known figures when the daemon does not answer):
//
//	crash_batch_size, coverage_batch_size, corpus_batch_size, stats_batch_size:
//	    events of that kind in the daemon's spool, not yet delivered to the master
//	event_queue_size, event_queue_cap: events this collector sent and the daemon has not
//	    acknowledged yet, and the most it keeps
//	batch_size_limit (int), flush_interval (time.Duration): the daemon's settings
//
// and pfcollector's own: daemon_connected, daemon_error, events_handled (by type),
// events_failed, unknown_events and unknown_event_types (by type), progress_updates
// (progress stats, not sent), crashes_without_input, crashes_outboxed, client (Counters).
func (c *Collector) GetStats() (stats map[string]any) {
	defer func() {
		if r := recover(); r != nil {
			stats = map[string]any{"daemon_error": fmt.Sprintf("internal error (recovered): %v", r)}
		}
	}()
	status, err := c.client.Status(c.opts.StatusTimeout)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil {
		c.lastStatus, c.statusErr = status, ""
	} else {
		c.statusErr = err.Error()
	}
	st := c.lastStatus
	kinds := dig(st, "spool", "kinds")
	spooled := func(kind string) int64 {
		n, _ := asInt64(dig(kinds, kind)["spooled"])
		return n
	}
	cfg := dig(st, "config")
	batch, _ := asInt64(cfg["batch_size"])
	flushS, _ := asFloat64(cfg["flush_interval"])
	handled := make(map[string]int64, len(c.handled))
	for k, v := range c.handled {
		handled[k] = v
	}
	unknown := make(map[string]int64, len(c.unknown))
	for k, v := range c.unknown {
		unknown[k] = v
	}
	return map[string]any{
		"crash_batch_size":      spooled("crash"),
		"coverage_batch_size":   spooled("coverage"),
		"corpus_batch_size":     spooled("corpus"),
		"stats_batch_size":      spooled("stats"),
		"event_queue_size":      c.client.Pending(),
		"event_queue_cap":       c.client.opts.MaxPending,
		"batch_size_limit":      int(batch),
		"flush_interval":        time.Duration(flushS * float64(time.Second)),
		"daemon_connected":      c.client.Connected(),
		"daemon_error":          c.statusErr,
		"events_handled":        handled,
		"events_failed":         c.failed,
		"unknown_events":        c.unknownN,
		"unknown_event_types":   unknown,
		"progress_updates":      c.progress,
		"crashes_without_input": c.noInput,
		"crashes_outboxed":      c.outboxed,
		"client":                c.client.Stats(),
	}
}

// SetBatchSize asks the daemon to batch n events per request to the master (its `tune`
// control op; it applies to the whole daemon, which keeps it until it restarts). Ignored
// when n is not positive. Bounded by StatusTimeout; a failure is logged, not returned.
func (c *Collector) SetBatchSize(n int) {
	if n <= 0 {
		return
	}
	c.tune(map[string]any{"batch_size": n})
}

// SetFlushInterval asks the daemon to flush batches every d (its `tune` control op;
// daemon-wide). Ignored when d is not positive.
func (c *Collector) SetFlushInterval(d time.Duration) {
	if d <= 0 {
		return
	}
	c.tune(map[string]any{"flush_interval": d.Seconds()})
}

func (c *Collector) tune(args map[string]any) {
	defer func() { _ = recover() }()
	if _, err := c.client.Control("tune", args, c.opts.StatusTimeout); err != nil {
		c.client.logf("tune %v not applied: %v", args, err)
	}
}

// dig walks nested maps; nil when a step is missing.
func dig(m map[string]any, keys ...string) map[string]any {
	for _, k := range keys {
		next, ok := m[k].(map[string]any)
		if !ok {
			return nil
		}
		m = next
	}
	return m
}
