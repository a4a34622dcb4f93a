// Package pfclient is the Go client of the pfcollector daemon (docs/protocol.md, version 1)
// and a drop-in collector for the PandaFuzz bot (Collector).
//
// A Client owns one Unix socket connection, kept by a background goroutine: it dials, sends
// the hello, waits for the welcome, resends every event not yet acknowledged (same id, fresh
// seq) and then writes new events as callers queue them; a reader goroutine takes the acks,
// errors and control replies. Callers never touch the socket: queueing an event is a
// memory operation, and every wait (a crash's acknowledgement, Flush, a control request) is
// bounded by the caller's budget. Fail-open: with no daemon, calls return an error at once
// (or after their budget), crashes go to the outbox, and nothing panics.
package pfclient

import (
	"errors"
	"fmt"
	"log"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Defaults of Options.
const (
	DefaultTimeout         = 5 * time.Second
	DefaultMaxPending      = 4096
	DefaultMaxPendingBytes = 64 * 1024 * 1024
	// RejectedKeep is how many rejections Rejected() keeps (the oldest are dropped).
	RejectedKeep = 256
	backoffMin   = 100 * time.Millisecond
	backoffMax   = 5 * time.Second
	writeChunk   = 256 * 1024
)

// Options configure a Client. The zero value of every field means its default.
type Options struct {
	// SocketPath of the daemon; DefaultSocketPath() when empty.
	SocketPath string
	// JobID and Fuzzer go in the hello; every event belongs to JobID unless it names its own.
	JobID  string
	Fuzzer string
	// Timeout bounds connecting, each write and each control request (default 5 s).
	Timeout time.Duration
	// CrashTimeout bounds the wait for a crash's acknowledgement before it goes to the
	// outbox (default: Timeout).
	CrashTimeout time.Duration
	// MaxPending and MaxPendingBytes bound the events kept until acknowledged (defaults
	// 4096 events, 64 MiB). When they are reached, the oldest stats or coverage event queued
	// is dropped to make room; if there is none, a call waits up to Timeout for acks (not at
	// all while the daemon is down) and then returns ErrQueueFull.
	MaxPending      int
	MaxPendingBytes int64
	// OutboxDir for crashes the daemon cannot acknowledge. The daemon's own (from its
	// welcome) is used when known; else this; else DefaultOutboxDir().
	OutboxDir string
	// AllowUIDs the daemon may run as, besides this process's uid, root and the uids of
	// $PFCOLLECTOR_DAEMON_UID (comma-separated); checked with SO_PEERCRED on Linux.
	AllowUIDs []int
	// Logf receives the client's rare log lines (connection lost, crash outboxed); the
	// standard logger when nil.
	Logf func(format string, args ...any)
}

// Client is a connection to the pfcollector daemon. All methods are safe for concurrent use.
type Client struct {
	opts      Options
	path      string
	allowUIDs map[int]bool
	logf      func(string, ...any)

	mu         sync.Mutex
	queue      []*pending // in queue order; the ones written on this connection come first
	queueBytes int64
	space      chan struct{} // closed (and replaced) whenever an event leaves the queue
	wake       chan struct{} // capacity 1: "there is something to write"
	controls   []*control    // to write
	waiting    map[int64]*control
	nextReq    int64
	gen        uint64 // the current connection
	seq        int64  // last seq used on it
	connected  bool
	maxFrame   int
	welcomed   bool   // some daemon answered a hello once
	outboxDir  string // the daemon's outbox, from its welcome ("" when it had none)
	lastErr    error
	down       bool // the last connection attempt failed (cleared by a welcome)
	hung       bool // connected, but a crash's ack did not come in time (cleared by any answer)
	rejected   []*RejectedError
	unreported []*RejectedError
	counters   Counters
	started    bool
	closed     bool
	stop       chan struct{}
	done       chan struct{}
}

// Counters are the client's own figures since it was made.
type Counters struct {
	Queued     int64 // events queued
	Acked      int64 // events acknowledged (accepted)
	Rejected   int64 // events refused by the daemon
	Outboxed   int64 // events written to the outbox (crashes; corpus and lifecycle at Close)
	Dropped    int64 // events dropped: queue full, or unacknowledged at Close
	Connects   int64 // successful handshakes
	ConnectErr int64 // failed connection attempts
}

// NewClient checks the options and starts the background connection. It does not wait for
// the daemon: with none, events queue (bounded) and crashes go to the outbox.
func NewClient(opts Options) (*Client, error) {
	c, err := newClient(opts)
	if err != nil {
		return nil, err
	}
	c.Start()
	return c, nil
}

func newClient(opts Options) (*Client, error) {
	if err := checkName("job_id", opts.JobID); err != nil {
		return nil, err
	}
	if err := checkName("fuzzer", opts.Fuzzer); err != nil {
		return nil, err
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.CrashTimeout <= 0 {
		opts.CrashTimeout = opts.Timeout
	}
	if opts.MaxPending <= 0 {
		opts.MaxPending = DefaultMaxPending
	}
	if opts.MaxPendingBytes <= 0 {
		opts.MaxPendingBytes = DefaultMaxPendingBytes
	}
	c := &Client{
		opts:      opts,
		path:      opts.SocketPath,
		allowUIDs: map[int]bool{os.Getuid(): true, 0: true},
		logf:      opts.Logf,
		space:     make(chan struct{}),
		wake:      make(chan struct{}, 1),
		waiting:   map[int64]*control{},
		maxFrame:  DefaultMaxFrame,
		stop:      make(chan struct{}),
		done:      make(chan struct{}),
	}
	if c.path == "" {
		c.path = DefaultSocketPath()
	}
	if c.logf == nil {
		c.logf = func(format string, args ...any) { log.Printf(format, args...) }
	}
	for _, uid := range opts.AllowUIDs {
		c.allowUIDs[uid] = true
	}
	if s := os.Getenv("PFCOLLECTOR_DAEMON_UID"); s != "" {
		for _, part := range strings.Split(s, ",") {
			part = strings.TrimSpace(part)
			if part == "" {
				continue
			}
			uid, err := strconv.Atoi(part)
			if err != nil || uid < 0 {
				return nil, fmt.Errorf("pfclient: PFCOLLECTOR_DAEMON_UID must be uids separated by commas, got %q", s)
			}
			c.allowUIDs[uid] = true
		}
	}
	return c, nil
}

// Start starts the background connection (NewClient does; a Collector starts it in Start).
func (c *Client) Start() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.started || c.closed {
		return
	}
	c.started = true
	go c.run()
}

// SocketPath is the daemon socket this client uses.
func (c *Client) SocketPath() string { return c.path }

// Connected reports whether the client holds a welcomed connection right now.
func (c *Client) Connected() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.connected
}

// LastError is the last connection problem (nil when none since the last handshake).
func (c *Client) LastError() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastErr
}

// Pending is the number of events waiting for the daemon's acknowledgement.
func (c *Client) Pending() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.queue)
}

// Stats returns the client's counters.
func (c *Client) Stats() Counters {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.counters
}

// Rejected returns the rejections seen (newest last, at most RejectedKeep).
func (c *Client) Rejected() []*RejectedError {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*RejectedError(nil), c.rejected...)
}

// Send queues ev and returns its id without waiting for the acknowledgement. It waits (up
// to Timeout) only when MaxPending/MaxPendingBytes are reached by events other than stats
// and coverage, and the daemon is up (see Options.MaxPending).
func (c *Client) Send(ev Event) (id string, err error) {
	defer recoverTo(&err)
	p, err := c.enqueue(ev, c.opts.Timeout)
	if err != nil {
		return "", err
	}
	return p.id, nil
}

// SendWait queues ev and waits up to timeout for the daemon's acknowledgement.
func (c *Client) SendWait(ev Event, timeout time.Duration) (id string, err error) {
	defer recoverTo(&err)
	deadline := time.Now().Add(timeout)
	p, err := c.enqueue(ev, timeout)
	if err != nil {
		return "", err
	}
	if err := c.waitFor(p, time.Until(deadline)); err != nil {
		return p.id, err
	}
	return p.id, nil
}

// Crash sends a crash (ev.Kind "crash", or empty) and waits up to CrashTimeout until the
// daemon has stored it durably. If the daemon cannot acknowledge it in time (down, killed,
// spool full), the crash is written to the outbox and an *OutboxedError is returned
// (errors.Is(err, ErrOutboxed)): it is saved, the daemon imports it when it runs. It goes
// to the outbox at once, without waiting, while the last connection attempt failed (no
// daemon) or while a connected daemon has not answered since a crash's ack timed out (hung).
// Other errors mean the crash was not saved.
func (c *Client) Crash(ev Event) (id string, err error) {
	defer recoverTo(&err)
	if ev.Kind == "" {
		ev.Kind = "crash"
	}
	if ev.Kind != "crash" {
		return "", fmt.Errorf("pfclient: Crash needs kind crash, got %q", ev.Kind)
	}
	deadline := time.Now().Add(c.opts.CrashTimeout)
	p, err := c.enqueue(ev, c.opts.CrashTimeout)
	if err != nil {
		if errors.Is(err, ErrQueueFull) {
			p2, perr := c.build(ev)
			if perr != nil {
				return "", perr
			}
			return p2.id, c.outbox(p2, err, false)
		}
		return "", err
	}
	c.mu.Lock()
	down, hung, cause := c.down && !c.connected, c.hung, c.lastErr
	c.mu.Unlock()
	if down {
		return p.id, c.outbox(p, cause, true)
	}
	if hung {
		return p.id, c.outbox(p, errHung, true)
	}
	werr := c.waitFor(p, time.Until(deadline))
	if werr == nil {
		return p.id, nil
	}
	var rej *RejectedError
	if errors.As(werr, &rej) && !rej.retryable() {
		return p.id, werr
	}
	if errors.Is(werr, ErrTimeout) {
		c.mu.Lock()
		c.hung = c.connected // it is there but did not answer: later crashes do not wait
		c.mu.Unlock()
	}
	return p.id, c.outbox(p, werr, true)
}

// Flush waits up to timeout until every queued event is acknowledged (or refused). It
// returns the first rejection of an event nobody waited for since the last Flush, or
// ErrTimeout naming how many are still waiting.
func (c *Client) Flush(timeout time.Duration) (err error) {
	defer recoverTo(&err)
	deadline := time.Now().Add(timeout)
	for {
		c.mu.Lock()
		n, space, closed := len(c.queue), c.space, c.closed
		c.mu.Unlock()
		if n == 0 {
			break
		}
		if closed {
			return fmt.Errorf("%w with %d events unacknowledged", ErrClosed, n)
		}
		if c.isDown() {
			return fmt.Errorf("%w: %d events wait for it (%v)", ErrUnavailable, n, c.LastError())
		}
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("%w: %d events still unacknowledged after %v", ErrTimeout, n, timeout)
		}
		c.kick()
		waitOrTimeout(space, left)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.unreported) > 0 {
		first := c.unreported[0]
		c.unreported = nil
		return first
	}
	return nil
}

// Control sends a control request (e.g. "status", "tune", "flush") and waits up to timeout
// for the reply's result.
func (c *Client) Control(op string, args map[string]any, timeout time.Duration) (result any, err error) {
	defer recoverTo(&err)
	if args == nil {
		args = map[string]any{}
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	c.nextReq++
	req := c.nextReq
	frame, err := encodeFrame(map[string]any{"t": "control", "req": req, "op": op, "args": args})
	if err != nil {
		c.mu.Unlock()
		return nil, err
	}
	ctl := &control{req: req, frame: frame, reply: make(chan controlResult, 1)}
	c.controls = append(c.controls, ctl)
	c.waiting[req] = ctl
	c.mu.Unlock()
	c.kick()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case r := <-ctl.reply:
		return r.value, r.err
	case <-t.C:
		c.mu.Lock()
		delete(c.waiting, req)
		c.dropControl(ctl)
		c.mu.Unlock()
		return nil, fmt.Errorf("%w: control %q after %v", ErrTimeout, op, timeout)
	}
}

// Status asks the daemon for its status document (docs/status.md).
func (c *Client) Status(timeout time.Duration) (map[string]any, error) {
	v, err := c.Control("status", nil, timeout)
	if err != nil {
		return nil, err
	}
	m, ok := v.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("pfclient: status reply is %T, not a map", v)
	}
	return m, nil
}

// Close stops the connection. Crashes, corpus and lifecycle events still unacknowledged are
// written to the outbox; stats and coverage are dropped, and the returned error counts them. Close does
// not flush: call Flush first. Closing twice returns ErrClosed.
func (c *Client) Close() (err error) {
	defer recoverTo(&err)
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return ErrClosed
	}
	c.closed = true
	started := c.started
	close(c.stop)
	c.mu.Unlock()
	if started {
		select {
		case <-c.done:
		case <-time.After(c.opts.Timeout):
		}
	}
	c.mu.Lock()
	left := c.queue
	c.queue = nil
	c.queueBytes = 0
	for _, ctl := range c.waiting {
		ctl.reply <- controlResult{err: ErrClosed}
	}
	c.waiting = map[int64]*control{}
	c.controls = nil
	c.mu.Unlock()
	var crashErr error
	dropped, saved := 0, 0
	for _, p := range left {
		if p.kind == "stats" || p.kind == "coverage" {
			dropped++ // snapshots: the next run sends fresher ones
			c.finish(p, ErrClosed)
			continue
		}
		err := c.outbox(p, ErrClosed, false)
		switch {
		case errors.Is(err, ErrOutboxed):
			saved++
		case p.kind == "crash":
			if crashErr == nil {
				crashErr = err
			}
		default:
			dropped++
		}
	}
	c.mu.Lock()
	c.counters.Dropped += int64(dropped)
	c.notifySpace()
	c.mu.Unlock()
	if saved > 0 {
		c.logf("pfclient: closed with %d unacknowledged events written to the outbox", saved)
	}
	if crashErr != nil {
		return crashErr
	}
	if dropped > 0 {
		return fmt.Errorf("pfclient: closed with %d events unacknowledged and not saved (dropped)", dropped)
	}
	return nil
}

// recoverTo turns a panic inside a public method into an error: the fuzzer comes first.
func recoverTo(err *error) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("pfclient: internal error (recovered): %v", r)
	}
}

// isDown: not connected, and the last connection attempt failed.
func (c *Client) isDown() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.down && !c.connected
}

// welcomeOutbox is the outbox the daemon named in its last welcome ("" if none).
func (c *Client) welcomeOutbox() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.outboxDir
}
