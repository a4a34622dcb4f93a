package pfclient

// The queue of events waiting for the daemon's acknowledgement, and the outbox for crashes.

import (
	"errors"
	"fmt"
	"math"
	"sync"
	"time"
)

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
			if p.kind != "crash" { // Crash saves it in the outbox
				c.counters.Dropped++
			}
			c.mu.Unlock()
			return nil, fmt.Errorf("%w (%v)", ErrQueueFull, c.lastErr)
		}
		space := c.space
		c.mu.Unlock()
		left := time.Until(deadline)
		if left <= 0 {
			c.mu.Lock()
			if p.kind != "crash" { // Crash saves it in the outbox
				c.counters.Dropped++
			}
			c.mu.Unlock()
			return nil, ErrQueueFull
		}
		c.kick()
		waitOrTimeout(space, left)
		c.mu.Lock()
	}
	c.queue = append(c.queue, p)
	c.queueBytes += p.size
	c.counters.Queued++
	c.mu.Unlock()
	c.kick()
	return p, nil
}

// waitOrTimeout waits until ch is closed (the queue has room again) or d has passed.
func waitOrTimeout(ch <-chan struct{}, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ch:
	case <-t.C:
	}
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

// outbox writes event p (a crash; at Close also corpus and lifecycle events) to the outbox. queued: p may still be in the queue (it is taken
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
		c.logf("%s %s lost: the daemon did not take it (%v) and the outbox failed: %v", p.kind, p.id, cause, err)
		return fmt.Errorf("pfclient: %s %s not saved: daemon: %v; outbox: %w", p.kind, p.id, cause, err)
	}
	c.mu.Lock()
	c.counters.Outboxed++
	c.mu.Unlock()
	out := &OutboxedError{ID: p.id, Path: path, Cause: cause}
	c.finish(p, out)
	if p.kind == "crash" {
		c.logf("%v", out)
	}
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
