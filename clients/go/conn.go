package pfclient

// The connection: a writer goroutine (dial, hello, resend, write) and a reader goroutine
// (acks, errors, replies) per connection.

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"time"
)

// run keeps the connection: dial, handshake, write; after a failure (or a connection that
// broke within a second of its welcome), back off (100 ms doubling to 5 s); after a good
// session that ended, reconnect at once, but only when there is something to send.
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
		began := time.Now()
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
		if welcomed && time.Since(began) >= time.Second {
			backoff = backoffMin
			continue // it worked for a while: reconnect at once
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
	c.hung = false // it answers
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
