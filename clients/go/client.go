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
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log"
	"math"
	"net"
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

// Event is one event for the daemon: a kind of docs/protocol.md and its fields at the top
// level (Fields values: string, []byte, integers, floats, bool, []string, [][]byte).
type Event struct {
	Kind   string
	ID     string    // a fresh UUID4 when empty
	JobID  string    // the client's JobID when empty
	Time   time.Time // now when zero
	Fields map[string]any
}

// Kinds are the event kinds the daemon knows.
var Kinds = []string{"crash", "coverage", "corpus", "stats", "started", "stopped", "error", "timeout"}

// pending is one event from the moment it is queued until an ack covers it, an error names
// its seq, or it goes to the outbox.
type pending struct {
	id      string
	kind    string
	jobID   string
	entries []byte // every key/value pair of the event map except "seq", encoded
	nkeys   int
	size    int64
	gen     uint64 // the connection it was last written on (0: none yet)
	seq     int64  // its seq on that connection
	done    chan struct{}
	once    sync.Once
	err     error
}

type control struct {
	req   int64
	frame []byte
	reply chan controlResult
}

type controlResult struct {
	value any
	err   error
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
	Outboxed   int64 // crashes written to the outbox
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
// (errors.Is(err, ErrOutboxed)): it is saved, the daemon imports it when it runs. Other
// errors mean the crash was not saved.
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
	down, cause := c.down && !c.connected, c.lastErr
	c.mu.Unlock()
	if down {
		return p.id, c.outbox(p, cause, true)
	}
	werr := c.waitFor(p, time.Until(deadline))
	if werr == nil {
		return p.id, nil
	}
	var rej *RejectedError
	if errors.As(werr, &rej) && !rej.retryable() {
		return p.id, werr
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
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("%w: %d events still unacknowledged after %v", ErrTimeout, n, timeout)
		}
		c.kick()
		t := time.NewTimer(left)
		select {
		case <-space:
		case <-t.C:
		}
		t.Stop()
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

// Close stops the connection. Crashes still unacknowledged are written to the outbox;
// other unacknowledged events are dropped, and the returned error counts them. Close does
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
	dropped := 0
	for _, p := range left {
		if p.kind == "crash" {
			if err := c.outbox(p, ErrClosed, false); !errors.Is(err, ErrOutboxed) && crashErr == nil {
				crashErr = err
			}
			continue
		}
		dropped++
		c.finish(p, ErrClosed)
	}
	c.mu.Lock()
	c.counters.Dropped += int64(dropped)
	c.notifySpace()
	c.mu.Unlock()
	if crashErr != nil {
		return crashErr
	}
	if dropped > 0 {
		return fmt.Errorf("pfclient: closed with %d events unacknowledged (dropped)", dropped)
	}
	return nil
}

// -- queueing --------------------------------------------------------------------------------

// build makes the pending event for ev (not queued).
func (c *Client) build(ev Event) (*pending, error) {
	if !validKind(ev.Kind) {
		return nil, fmt.Errorf("pfclient: unknown event kind %q", ev.Kind)
	}
	id := ev.ID
	if id == "" {
		id = newID()
	} else if !ValidID(id) {
		return nil, fmt.Errorf("pfclient: event id %q is not 1..64 characters of [A-Za-z0-9._:-]", id)
	}
	if ev.JobID != "" {
		if err := checkName("job_id", ev.JobID); err != nil {
			return nil, err
		}
	}
	when := ev.Time
	if when.IsZero() {
		when = time.Now()
	}
	ts := float64(when.UnixNano()) / 1e9
	if ts < 0 || math.IsNaN(ts) {
		ts = float64(time.Now().UnixNano()) / 1e9
	}
	m := make(map[string]any, len(ev.Fields)+4)
	for k, v := range ev.Fields {
		m[k] = v
	}
	m["t"], m["kind"], m["id"], m["ts"] = "event", ev.Kind, id, ts
	if ev.JobID != "" {
		m["job_id"] = ev.JobID
	}
	if _, ok := m["seq"]; ok {
		return nil, errors.New("pfclient: an event's fields must not hold \"seq\"")
	}
	full, err := appendMap(nil, m)
	if err != nil {
		return nil, err
	}
	entries := full[mapHeaderLen(full):]
	return &pending{
		id: id, kind: ev.Kind, jobID: ev.JobID, entries: entries, nkeys: len(m),
		size: int64(len(entries)) + 32, done: make(chan struct{}),
	}, nil
}

func (c *Client) enqueue(ev Event, budget time.Duration) (*pending, error) {
	p, err := c.build(ev)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(budget)
	c.mu.Lock()
	if p.size > int64(c.maxFrame) {
		c.mu.Unlock()
		return nil, fmt.Errorf("%w: %s event of %d bytes, max_frame %d", ErrTooLarge, ev.Kind, p.size, c.maxFrame)
	}
	for {
		if c.closed {
			c.mu.Unlock()
			return nil, ErrClosed
		}
		if len(c.queue) < c.opts.MaxPending &&
			(c.queueBytes+p.size <= c.opts.MaxPendingBytes || len(c.queue) == 0) {
			break
		}
		// Full. Stats and coverage are snapshots (the latest says it all): the oldest one
		// queued makes room for any event. Otherwise wait for acks, unless the daemon is down.
		if victim := c.oldestSnapshot(); victim != nil {
			c.remove(victim)
			c.finish(victim, ErrQueueFull)
			c.counters.Dropped++
			continue
		}
		if c.down && !c.connected {
			c.counters.Dropped++
			c.mu.Unlock()
			return nil, fmt.Errorf("%w (%v)", ErrQueueFull, c.lastErr)
		}
		space := c.space
		c.mu.Unlock()
		left := time.Until(deadline)
		if left <= 0 {
			c.mu.Lock()
			c.counters.Dropped++
			c.mu.Unlock()
			return nil, ErrQueueFull
		}
		c.kick()
		t := time.NewTimer(left)
		select {
		case <-space:
		case <-t.C:
		}
		t.Stop()
		c.mu.Lock()
	}
	c.queue = append(c.queue, p)
	c.queueBytes += p.size
	c.counters.Queued++
	c.mu.Unlock()
	c.kick()
	return p, nil
}

// waitFor waits until p is acknowledged or refused, up to left.
func (c *Client) waitFor(p *pending, left time.Duration) error {
	if left <= 0 {
		left = time.Millisecond
	}
	t := time.NewTimer(left)
	defer t.Stop()
	select {
	case <-p.done:
		return p.err
	case <-t.C:
		c.mu.Lock()
		cause := c.lastErr
		c.mu.Unlock()
		if cause != nil {
			return fmt.Errorf("%w after %v (%v)", ErrTimeout, left, cause)
		}
		return fmt.Errorf("%w after %v", ErrTimeout, left)
	}
}

// outbox writes crash p to the outbox. queued: p may still be in the queue (it is taken
// out first, unless it was acknowledged meanwhile).
func (c *Client) outbox(p *pending, cause error, queued bool) error {
	c.mu.Lock()
	if queued {
		select {
		case <-p.done:
			c.mu.Unlock()
			if p.err == nil {
				return nil // acknowledged just now
			}
			var rej *RejectedError
			if errors.As(p.err, &rej) && !rej.retryable() {
				return p.err
			}
			c.mu.Lock()
		default:
		}
	}
	dir := c.opts.OutboxDir
	switch {
	case c.welcomed && c.outboxDir != "":
		dir = c.outboxDir
	case c.welcomed:
		c.mu.Unlock()
		return fmt.Errorf("%w (%v)", ErrNoOutbox, cause)
	case dir == "":
		dir = DefaultOutboxDir()
	}
	if queued {
		c.remove(p)
	}
	jobID := p.jobID
	if jobID == "" {
		jobID = c.opts.JobID
	}
	c.mu.Unlock()
	path, err := writeOutboxFrames(dir, p.id, c.helloFrame(jobID), p.frame(1))
	if err != nil {
		c.finish(p, err)
		c.logf("crash %s lost: the daemon did not take it (%v) and the outbox failed: %v", p.id, cause, err)
		return fmt.Errorf("pfclient: crash %s not saved: daemon: %v; outbox: %w", p.id, cause, err)
	}
	c.mu.Lock()
	c.counters.Outboxed++
	c.mu.Unlock()
	out := &OutboxedError{ID: p.id, Path: path, Cause: cause}
	c.finish(p, out)
	c.logf("%v", out)
	return out
}

// oldestSnapshot is the oldest stats or coverage event queued, or nil (c.mu held).
func (c *Client) oldestSnapshot() *pending {
	for _, p := range c.queue {
		if p.kind == "stats" || p.kind == "coverage" {
			return p
		}
	}
	return nil
}

// remove takes p out of the queue (c.mu held).
func (c *Client) remove(p *pending) {
	for i, q := range c.queue {
		if q == p {
			copy(c.queue[i:], c.queue[i+1:])
			c.queue[len(c.queue)-1] = nil
			c.queue = c.queue[:len(c.queue)-1]
			c.queueBytes -= p.size
			c.notifySpace()
			return
		}
	}
}

// finish marks p done with err (once).
func (c *Client) finish(p *pending, err error) {
	p.once.Do(func() {
		p.err = err
		close(p.done)
	})
}

// notifySpace wakes every caller waiting for room (c.mu held).
func (c *Client) notifySpace() {
	close(c.space)
	c.space = make(chan struct{})
}

func (c *Client) kick() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *Client) dropControl(ctl *control) {
	for i, x := range c.controls {
		if x == ctl {
			c.controls = append(c.controls[:i], c.controls[i+1:]...)
			return
		}
	}
}

// -- frames -----------------------------------------------------------------------------------

func (c *Client) helloFrame(jobID string) []byte {
	f, _ := encodeFrame(map[string]any{
		"t": "hello", "v": ProtocolVersion, "job_id": jobID, "fuzzer": c.opts.Fuzzer, "pid": os.Getpid(),
	})
	return f
}

// frame is p as one frame with seq.
func (p *pending) frame(seq int64) []byte {
	b := make([]byte, headerSize, headerSize+len(p.entries)+24)
	b = appendMapHeader(b, p.nkeys+1)
	b = appendString(b, "seq")
	b = appendInt(b, seq)
	b = append(b, p.entries...)
	binary.BigEndian.PutUint32(b, uint32(len(b)-headerSize))
	return b
}

func appendMapHeader(b []byte, n int) []byte {
	switch {
	case n < 16:
		return append(b, 0x80|byte(n))
	case n <= math.MaxUint16:
		return append(b, 0xde, byte(n>>8), byte(n))
	default:
		b = append(b, 0xdf)
		return binary.BigEndian.AppendUint32(b, uint32(n))
	}
}

func mapHeaderLen(b []byte) int {
	switch b[0] {
	case 0xde:
		return 3
	case 0xdf:
		return 5
	}
	return 1
}

func validKind(kind string) bool {
	for _, k := range Kinds {
		if k == kind {
			return true
		}
	}
	return false
}

// writeOutboxFrames writes the two frames of one outbox file (see WriteOutbox).
func writeOutboxFrames(dir, id string, hello, event []byte) (string, error) {
	return writeOutboxBytes(dir, id, append(append([]byte(nil), hello...), event...))
}

// -- the connection ------------------------------------------------------------------------

// run keeps the connection: dial, handshake, write; after a failure, back off (100 ms
// doubling to 5 s); after a good session that ended, reconnect only when there is
// something to send.
func (c *Client) run() {
	defer close(c.done)
	backoff := backoffMin
	first := true
	for {
		if !first {
			c.mu.Lock()
			idle := len(c.queue) == 0 && len(c.controls) == 0
			c.mu.Unlock()
			if idle {
				select {
				case <-c.stop:
					return
				case <-c.wake:
				}
			}
		}
		first = false
		welcomed, err := c.session()
		select {
		case <-c.stop:
			return
		default:
		}
		c.mu.Lock()
		if err != nil {
			if c.lastErr == nil || c.lastErr.Error() != err.Error() {
				c.logf("%v", err)
			}
			c.lastErr = err
			if !welcomed {
				c.counters.ConnectErr++
				c.down = true
			}
		}
		// Control requests cannot outlive their connection: fail them now.
		for _, ctl := range c.waiting {
			ctl.reply <- controlResult{err: fmt.Errorf("%w: %v", ErrUnavailable, err)}
		}
		c.waiting = map[int64]*control{}
		c.controls = nil
		c.mu.Unlock()
		if welcomed {
			backoff = backoffMin
			continue
		}
		t := time.NewTimer(backoff)
		select {
		case <-c.stop:
			t.Stop()
			return
		case <-t.C:
		}
		backoff *= 2
		if backoff > backoffMax {
			backoff = backoffMax
		}
	}
}

// session runs one connection until it breaks or the client stops. welcomed says whether
// the handshake succeeded.
func (c *Client) session() (welcomed bool, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("pfclient: internal error (recovered): %v", r)
		}
	}()
	d := net.Dialer{Timeout: c.opts.Timeout}
	raw, err := d.Dial("unix", c.path)
	if err != nil {
		return false, fmt.Errorf("%w at %s: %v", ErrUnavailable, c.path, err)
	}
	conn := raw.(*net.UnixConn)
	defer conn.Close()
	uid, err := peerUID(conn)
	if err != nil {
		return false, fmt.Errorf("pfclient: cannot check the daemon at %s: %v", c.path, err)
	}
	if peerCheckSupported && !c.allowUIDs[uid] {
		return false, fmt.Errorf("pfclient: refusing the daemon at %s: it runs as uid %d, not this "+
			"process's uid %d, root, or $PFCOLLECTOR_DAEMON_UID", c.path, uid, os.Getuid())
	}
	c.mu.Lock()
	c.gen++
	gen := c.gen
	c.seq = 0
	c.mu.Unlock()
	welcome := make(chan error, 1)
	dead := make(chan struct{})
	readErr := make(chan error, 1)
	go c.readLoop(conn, gen, welcome, dead, readErr)
	defer func() { <-dead }()
	defer conn.Close()

	_ = conn.SetWriteDeadline(time.Now().Add(c.opts.Timeout))
	if _, err := conn.Write(c.helloFrame(c.opts.JobID)); err != nil {
		return false, fmt.Errorf("%w: hello to %s: %v", ErrUnavailable, c.path, err)
	}
	t := time.NewTimer(c.opts.Timeout)
	select {
	case err := <-welcome:
		t.Stop()
		if err != nil {
			return false, err
		}
	case <-dead:
		t.Stop()
		return false, fmt.Errorf("%w: %s closed the connection before its welcome (%v)", ErrUnavailable, c.path, <-readErr)
	case <-t.C:
		return false, fmt.Errorf("%w: no welcome from %s within %v", ErrUnavailable, c.path, c.opts.Timeout)
	case <-c.stop:
		t.Stop()
		return false, nil
	}
	c.mu.Lock()
	c.connected = true
	c.lastErr = nil
	c.down = false
	c.counters.Connects++
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.connected = false
		c.mu.Unlock()
	}()
	for {
		if err := c.writeQueued(conn, gen); err != nil {
			return true, fmt.Errorf("%w: writing to %s: %v", ErrUnavailable, c.path, err)
		}
		select {
		case <-c.wake:
		case <-dead:
			return true, fmt.Errorf("%w: %s closed the connection (%v)", ErrUnavailable, c.path, <-readErr)
		case <-c.stop:
			return true, nil
		}
	}
}

// writeQueued writes every event not yet written on connection gen (with fresh seqs, in
// queue order) and every control request waiting.
func (c *Client) writeQueued(conn *net.UnixConn, gen uint64) error {
	for {
		c.mu.Lock()
		var batch []*pending
		var seqs []int64
		var size int64
		for _, p := range c.queue {
			if p.gen == gen {
				continue
			}
			if p.size > int64(c.maxFrame) {
				continue // the daemon lowered max_frame; left for the flush timeout / outbox
			}
			c.seq++
			p.gen, p.seq = gen, c.seq
			batch = append(batch, p)
			seqs = append(seqs, c.seq)
			size += p.size
			if size >= writeChunk {
				break
			}
		}
		ctls := c.controls
		c.controls = nil
		c.mu.Unlock()
		if len(batch) == 0 && len(ctls) == 0 {
			return nil
		}
		buf := make([]byte, 0, size+64)
		for _, ctl := range ctls {
			buf = append(buf, ctl.frame...)
		}
		for i, p := range batch {
			buf = append(buf, p.frame(seqs[i])...)
		}
		_ = conn.SetWriteDeadline(time.Now().Add(c.opts.Timeout))
		if _, err := conn.Write(buf); err != nil {
			return err
		}
	}
}

// readLoop reads the daemon's messages on connection gen until it breaks.
func (c *Client) readLoop(conn *net.UnixConn, gen uint64, welcome chan<- error, dead chan<- struct{}, readErr chan<- error) {
	var err error
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("internal error (recovered): %v", r)
		}
		_ = conn.Close()
		readErr <- err
		close(dead)
	}()
	r := bufio.NewReaderSize(conn, 64*1024)
	var header [headerSize]byte
	for {
		if _, err = io.ReadFull(r, header[:]); err != nil {
			return
		}
		n := binary.BigEndian.Uint32(header[:])
		if n == 0 || n > maxIncomingFrame {
			err = fmt.Errorf("the daemon sent a frame of %d bytes", n)
			return
		}
		body := make([]byte, n)
		if _, err = io.ReadFull(r, body); err != nil {
			return
		}
		v, derr := decodeOne(body)
		msg, ok := v.(map[string]any)
		if derr != nil || !ok {
			err = fmt.Errorf("the daemon sent a frame that is not a message map (%v)", derr)
			return
		}
		t, _ := msg["t"].(string)
		c.handle(t, msg, gen, welcome)
	}
}

func (c *Client) handle(t string, msg map[string]any, gen uint64, welcome chan<- error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen {
		return
	}
	switch t {
	case "welcome":
		if mf, ok := asInt(msg["max_frame"]); ok && mf > 0 {
			c.maxFrame = int(mf)
		} else {
			c.maxFrame = DefaultMaxFrame
		}
		c.welcomed = true
		c.outboxDir, _ = msg["outbox"].(string)
		select {
		case welcome <- nil:
		default:
		}
	case "ack":
		acked, ok := asInt(msg["seq"])
		if !ok {
			return
		}
		n := 0
		for _, p := range c.queue {
			if p.gen != gen || p.seq <= 0 || p.seq > acked {
				break
			}
			c.queueBytes -= p.size
			c.finish(p, nil)
			n++
		}
		if n > 0 {
			for i := 0; i < n; i++ {
				c.queue[i] = nil
			}
			c.queue = c.queue[n:]
			c.counters.Acked += int64(n)
			c.notifySpace()
		}
	case "error":
		rej := &RejectedError{Fatal: msg["fatal"] == true}
		rej.Code, _ = msg["code"].(string)
		rej.Message, _ = msg["message"].(string)
		rej.Field, _ = msg["field"].(string)
		rej.Seq, _ = asInt(msg["seq"])
		if !c.connected {
			select {
			case welcome <- rej:
			default:
			}
			return
		}
		if rej.Seq > 0 {
			for _, p := range c.queue {
				if p.gen == gen && p.seq == rej.Seq {
					rej.ID = p.id
					c.remove(p)
					c.finish(p, rej)
					c.counters.Rejected++
					if p.kind != "crash" {
						c.unreported = append(c.unreported, rej)
						if len(c.unreported) > RejectedKeep {
							c.unreported = c.unreported[1:]
						}
					}
					break
				}
			}
		}
		c.rejected = append(c.rejected, rej)
		if len(c.rejected) > RejectedKeep {
			c.rejected = c.rejected[1:]
		}
		if rej.Fatal {
			c.lastErr = rej
		}
	case "reply":
		req, ok := asInt(msg["req"])
		if !ok {
			return
		}
		ctl := c.waiting[req]
		if ctl == nil {
			return
		}
		delete(c.waiting, req)
		if msg["ok"] == true {
			ctl.reply <- controlResult{value: msg["result"]}
		} else {
			e, _ := msg["error"].(string)
			ctl.reply <- controlResult{err: fmt.Errorf("pfcollector refused control request: %s", e)}
		}
	}
}

func asInt(v any) (int64, bool) {
	switch x := v.(type) {
	case int64:
		return x, true
	case uint64:
		return math.MaxInt64, true
	}
	return 0, false
}

// recoverTo turns a panic inside a public method into an error: the fuzzer comes first.
func recoverTo(err *error) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("pfclient: internal error (recovered): %v", r)
	}
}

// welcomeOutbox is the outbox the daemon named in its last welcome ("" if none).
func (c *Client) welcomeOutbox() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.outboxDir
}
