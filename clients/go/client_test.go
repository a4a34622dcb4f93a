package pfclient

// The Client against a scripted daemon on a real Unix socket (no pfcollector needed):
// resend with the same ids after a reconnect, rejections, peer uid refusal, fail-open.

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeDaemon accepts connections on a real Unix socket; each is handed to script.
type fakeDaemon struct {
	ln   *net.UnixListener
	path string
	wg   sync.WaitGroup
}

func newFakeDaemon(t *testing.T, script func(conn *fakeConn)) *fakeDaemon {
	t.Helper()
	path := filepath.Join(shortTempDir(t), "fake.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	d := &fakeDaemon{ln: ln, path: path}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		for {
			conn, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			d.wg.Add(1)
			go func() {
				defer d.wg.Done()
				defer conn.Close()
				script(&fakeConn{conn: conn, r: bufio.NewReader(conn)})
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); d.wg.Wait() })
	return d
}

type fakeConn struct {
	conn *net.UnixConn
	r    *bufio.Reader
}

// read returns the next message from the client, or nil at EOF.
func (f *fakeConn) read() map[string]any {
	var h [4]byte
	if _, err := io.ReadFull(f.r, h[:]); err != nil {
		return nil
	}
	body := make([]byte, binary.BigEndian.Uint32(h[:]))
	if _, err := io.ReadFull(f.r, body); err != nil {
		return nil
	}
	v, err := decodeOne(body)
	if err != nil {
		panic(err)
	}
	return v.(map[string]any)
}

func (f *fakeConn) send(m map[string]any) {
	frame, err := encodeFrame(m)
	if err != nil {
		panic(err)
	}
	_, _ = f.conn.Write(frame)
}

func (f *fakeConn) welcome(extra map[string]any) {
	m := map[string]any{"t": "welcome", "v": 1, "daemon": "fake", "max_frame": DefaultMaxFrame}
	for k, v := range extra {
		m[k] = v
	}
	f.send(m)
}

func testClient(t *testing.T, path string, opts Options) *Client {
	t.Helper()
	opts.SocketPath = path
	if opts.JobID == "" {
		opts.JobID = "job-t"
	}
	if opts.Fuzzer == "" {
		opts.Fuzzer = "go-test"
	}
	if opts.Logf == nil {
		opts.Logf = quietLog
	}
	if opts.OutboxDir == "" {
		opts.OutboxDir = filepath.Join(shortTempDir(t), "outbox")
	}
	c, err := NewClient(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestResendWithTheSameIdsAfterReconnect(t *testing.T) {
	type seen struct {
		conn   int
		seq    int64
		id     string
		kind   string
		job    string
		fields map[string]any
	}
	var mu sync.Mutex
	var log []seen
	conns := 0
	d := newFakeDaemon(t, func(f *fakeConn) {
		mu.Lock()
		conns++
		n := conns
		mu.Unlock()
		hello := f.read()
		if hello["t"] != "hello" || hello["v"] != int64(1) || hello["job_id"] != "job-t" || hello["fuzzer"] != "go-test" {
			panic(hello)
		}
		f.welcome(nil)
		for i := 0; ; i++ {
			m := f.read()
			if m == nil {
				return
			}
			seq, _ := m["seq"].(int64)
			mu.Lock()
			log = append(log, seen{n, seq, m["id"].(string), m["kind"].(string), "", m})
			mu.Unlock()
			if n == 1 && i == 2 {
				return // the first connection breaks after 3 events, none acknowledged
			}
			if n > 1 {
				f.send(map[string]any{"t": "ack", "seq": seq})
			}
		}
	})
	c := testClient(t, d.path, Options{})
	var ids []string
	for i := 0; i < 3; i++ {
		id, err := c.Send(Event{Kind: "stats", Fields: map[string]any{"executions": i}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if err := c.Flush(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	var first, second []seen
	for _, s := range log {
		if s.conn == 1 {
			first = append(first, s)
		} else {
			second = append(second, s)
		}
	}
	if len(first) != 3 || len(second) != 3 {
		t.Fatalf("first connection %v, second %v", first, second)
	}
	for i := range ids {
		if first[i].id != ids[i] || second[i].id != ids[i] || first[i].seq != int64(i+1) || second[i].seq != int64(i+1) {
			t.Fatalf("event %d: first %+v second %+v, id %s", i, first[i], second[i], ids[i])
		}
		if second[i].fields["executions"] != int64(i) {
			t.Fatalf("resent fields %v", second[i].fields)
		}
	}
	if c.Pending() != 0 || c.Stats().Acked != 3 || c.Stats().Connects < 2 {
		t.Fatalf("after flush: pending %d, %+v", c.Pending(), c.Stats())
	}
}

func TestRejectionsNameTheEvent(t *testing.T) {
	d := newFakeDaemon(t, func(f *fakeConn) {
		f.read()
		f.welcome(nil)
		for {
			m := f.read()
			if m == nil {
				return
			}
			seq := m["seq"].(int64)
			if m["kind"] == "crash" {
				f.send(map[string]any{"t": "error", "code": "wrong_type", "message": "crash event: field 'signal'",
					"seq": seq, "field": "signal", "fatal": false})
			} else if m["kind"] == "corpus" {
				f.send(map[string]any{"t": "error", "code": "too_long", "message": "too long", "seq": seq, "fatal": false})
			}
			f.send(map[string]any{"t": "ack", "seq": seq})
		}
	})
	c := testClient(t, d.path, Options{})
	id, err := c.Crash(Event{ID: "crash-1", Fields: map[string]any{"type": "SEGV", "input": []byte("x")}})
	var rej *RejectedError
	if !errors.As(err, &rej) || rej.Code != "wrong_type" || rej.Field != "signal" || rej.ID != "crash-1" || id != "crash-1" {
		t.Fatalf("crash: %v (%#v)", err, rej)
	}
	if _, err := c.Send(Event{Kind: "corpus", Fields: map[string]any{"files": []string{"a"}}}); err != nil {
		t.Fatal(err)
	}
	err = c.Flush(5 * time.Second)
	if !errors.As(err, &rej) || rej.Code != "too_long" {
		t.Fatalf("flush: %v", err)
	}
	if err := c.Flush(5 * time.Second); err != nil {
		t.Fatalf("a rejection is reported once: %v", err)
	}
	if n := len(c.Rejected()); n != 2 {
		t.Fatalf("rejected %d", n)
	}
	if files, _ := filepath.Glob(filepath.Join(c.opts.OutboxDir, "*")); len(files) != 0 {
		t.Fatalf("a refused crash is not for the outbox: %v", files)
	}
}

func TestSpoolFullCrashGoesToTheOutbox(t *testing.T) {
	outbox := filepath.Join(shortTempDir(t), "daemon-outbox")
	d := newFakeDaemon(t, func(f *fakeConn) {
		f.read()
		f.welcome(map[string]any{"outbox": outbox})
		for {
			m := f.read()
			if m == nil {
				return
			}
			seq := m["seq"].(int64)
			f.send(map[string]any{"t": "error", "code": "spool_full", "message": "full", "seq": seq, "fatal": false})
			f.send(map[string]any{"t": "ack", "seq": seq})
		}
	})
	c := testClient(t, d.path, Options{})
	_, err := c.Crash(Event{ID: "c-1", JobID: "j", Time: time.Unix(1700000000, 0),
		Fields: map[string]any{"type": "SEGV", "input": []byte("AB")}})
	var out *OutboxedError
	if !errors.As(err, &out) || !errors.Is(err, ErrOutboxed) || out.Path != filepath.Join(outbox, "c-1.pfev") {
		t.Fatalf("got %v", err)
	}
	checkOutboxFile(t, out.Path, "c-1", "j", []byte("AB"))
}

// checkOutboxFile reads an outbox file as the daemon does: exactly a hello frame and an
// event frame with seq 1 and the file's id, nothing after.
func checkOutboxFile(t *testing.T, path, id, job string, input []byte) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var frames []map[string]any
	for len(data) > 0 {
		if len(data) < 4 {
			t.Fatalf("trailing %d bytes", len(data))
		}
		n := int(binary.BigEndian.Uint32(data))
		if len(data) < 4+n {
			t.Fatalf("truncated frame")
		}
		v, err := decodeOne(data[4 : 4+n])
		if err != nil {
			t.Fatal(err)
		}
		frames = append(frames, v.(map[string]any))
		data = data[4+n:]
	}
	if len(frames) != 2 {
		t.Fatalf("%d frames", len(frames))
	}
	h, e := frames[0], frames[1]
	if h["t"] != "hello" || h["v"] != int64(1) || h["job_id"] != job || h["pid"] != int64(os.Getpid()) || len(h) != 5 {
		t.Fatalf("hello %v", h)
	}
	if e["t"] != "event" || e["seq"] != int64(1) || e["kind"] != "crash" || e["id"] != id || string(e["input"].([]byte)) != string(input) {
		t.Fatalf("event %v", e)
	}
	if _, ok := e["ts"].(float64); !ok {
		t.Fatalf("event ts %v", e["ts"])
	}
	info, _ := os.Stat(path)
	if info.Mode().Perm() != 0o640 {
		t.Fatalf("mode %v", info.Mode())
	}
	if strings.HasPrefix(filepath.Base(path), ".") {
		t.Fatal("temp name left")
	}
}

func TestNoDaemonFailsOpenWithinBudget(t *testing.T) {
	path := filepath.Join(shortTempDir(t), "nobody.sock")
	// A long budget: a call that waited for it would stand out.
	c := testClient(t, path, Options{Timeout: 20 * time.Second, MaxPending: 2})
	start := time.Now()
	var statsIDs []string
	for i := 0; i < 3; i++ {
		id, err := c.Send(Event{Kind: "stats", Fields: map[string]any{"executions": i}})
		if err != nil {
			t.Fatal(err)
		}
		statsIDs = append(statsIDs, id)
	}
	// The third stats event pushed out the first; two corpus events push out the rest.
	for i := 0; i < 2; i++ {
		if _, err := c.Send(Event{Kind: "corpus", Fields: map[string]any{"files": []string{"a"}}}); err != nil {
			t.Fatal(err)
		}
	}
	if c.Stats().Dropped != 3 || c.Pending() != 2 {
		t.Fatalf("%+v pending %d", c.Stats(), c.Pending())
	}
	waitFor(t, "a failed connection attempt", func() bool { return c.LastError() != nil })
	before := time.Now()
	if _, err := c.Send(Event{Kind: "started"}); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("a full queue of corpus events: %v", err)
	}
	if waited := time.Since(before); waited > 10*time.Second {
		t.Fatalf("with the daemon down a full queue should not wait (%v)", waited)
	}
	if _, err := c.Status(200 * time.Millisecond); err == nil {
		t.Fatal("status without a daemon")
	}
	id, err := c.Crash(Event{Fields: map[string]any{"type": "SEGV", "input": []byte{0, 1, 2}}})
	if !errors.Is(err, ErrOutboxed) {
		t.Fatalf("crash: %v", err)
	}
	checkOutboxFile(t, filepath.Join(c.opts.OutboxDir, id+".pfev"), id, "job-t", []byte{0, 1, 2})
	if err := c.Flush(20 * time.Second); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("flush with the daemon down: %v", err)
	}
	if c.LastError() == nil || !errors.Is(c.LastError(), ErrUnavailable) {
		t.Fatalf("last error %v", c.LastError())
	}
	// With the daemon known to be down, no call above waited for the 20 s budget.
	if elapsed := time.Since(start); elapsed > 10*time.Second {
		t.Fatalf("calls took %v", elapsed)
	}
	// Close: the two corpus events still queued go to the outbox (the stats were dropped).
	if err := c.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if files, _ := filepath.Glob(filepath.Join(c.opts.OutboxDir, "*.pfev")); len(files) != 3 {
		t.Fatalf("outbox after close: %v", files)
	}
	if st := c.Stats(); st.Outboxed != 3 || st.Dropped != 4 {
		t.Fatalf("%+v", st)
	}
	if err := c.Close(); !errors.Is(err, ErrClosed) {
		t.Fatalf("second close: %v", err)
	}
	if _, err := c.Send(Event{Kind: "stats"}); !errors.Is(err, ErrClosed) {
		t.Fatalf("after close: %v", err)
	}
}

func TestRefusesADaemonOfAnotherUser(t *testing.T) {
	accepted := make(chan struct{}, 8)
	d := newFakeDaemon(t, func(f *fakeConn) {
		accepted <- struct{}{}
		if f.read() != nil {
			f.welcome(nil)
		}
		f.read()
	})
	c, err := newClient(Options{SocketPath: d.path, JobID: "j", Fuzzer: "f", Timeout: time.Second,
		Logf: quietLog, OutboxDir: filepath.Join(shortTempDir(t), "outbox")})
	if err != nil {
		t.Fatal(err)
	}
	// Pretend this process is neither the daemon's uid nor root: allow only an unused uid.
	c.allowUIDs = map[int]bool{4242424: true}
	c.Start()
	defer c.Close()
	<-accepted
	waitFor(t, "the refusal", func() bool { return c.LastError() != nil })
	if !peerCheckSupported {
		t.Skip("SO_PEERCRED is Linux only")
	}
	if msg := c.LastError().Error(); !strings.Contains(msg, "refusing the daemon") || !strings.Contains(msg, "uid") {
		t.Fatalf("last error %q", msg)
	}
	if c.Connected() {
		t.Fatal("connected to a refused daemon")
	}
}

func TestDaemonUIDFromTheEnvironment(t *testing.T) {
	t.Setenv("PFCOLLECTOR_DAEMON_UID", "4321, 999")
	c, err := newClient(Options{JobID: "j", Fuzzer: "f"})
	if err != nil {
		t.Fatal(err)
	}
	if !c.allowUIDs[4321] || !c.allowUIDs[999] || len(c.allowUIDs) > 4 || !c.allowUIDs[0] || !c.allowUIDs[os.Getuid()] {
		t.Fatalf("allowed %v", c.allowUIDs)
	}
	t.Setenv("PFCOLLECTOR_DAEMON_UID", "daemon")
	if _, err := newClient(Options{JobID: "j", Fuzzer: "f"}); err == nil || !strings.Contains(err.Error(), "PFCOLLECTOR_DAEMON_UID") {
		t.Fatalf("bad uid: %v", err)
	}
}

func TestBadArgumentsAreClearErrors(t *testing.T) {
	for _, opts := range []Options{{Fuzzer: "f"}, {JobID: "j"}, {JobID: "a\nb", Fuzzer: "f"}, {JobID: strings.Repeat("x", 257), Fuzzer: "f"}} {
		if _, err := NewClient(opts); err == nil {
			t.Fatalf("%+v accepted", opts)
		}
	}
	c := testClient(t, filepath.Join(shortTempDir(t), "x.sock"), Options{Timeout: 50 * time.Millisecond})
	for _, ev := range []Event{{Kind: "nope"}, {Kind: "stats", ID: "has space"}, {Kind: "stats", JobID: "bad\x00"},
		{Kind: "stats", Fields: map[string]any{"seq": 1}}, {Kind: "stats", Fields: map[string]any{"x": struct{}{}}}} {
		if _, err := c.Send(ev); err == nil {
			t.Fatalf("%+v accepted", ev)
		}
	}
	if _, err := c.Crash(Event{Kind: "stats"}); err == nil {
		t.Fatal("Crash with kind stats")
	}
}

func TestDefaultSocketPath(t *testing.T) {
	t.Setenv("PFCOLLECTOR_SOCKET", "/x/explicit.sock")
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/7")
	if p := DefaultSocketPath(); p != "/x/explicit.sock" {
		t.Fatal(p)
	}
	t.Setenv("PFCOLLECTOR_SOCKET", "")
	if p := DefaultSocketPath(); p != "/run/user/7/pfcollector.sock" {
		t.Fatal(p)
	}
	t.Setenv("XDG_RUNTIME_DIR", "")
	want := filepath.Join("/tmp", "pfcollector-"+strconv.Itoa(os.Getuid()), "pfcollector.sock")
	if p := DefaultSocketPath(); p != want {
		t.Fatalf("%s, want %s", p, want)
	}
}

func TestDefaultOutboxDir(t *testing.T) {
	t.Setenv("PFCOLLECTOR_OUTBOX", "/o")
	if p := DefaultOutboxDir(); p != "/o" {
		t.Fatal(p)
	}
	t.Setenv("PFCOLLECTOR_OUTBOX", "")
	t.Setenv("PFCOLLECTOR_DATA_DIR", "/d")
	if p := DefaultOutboxDir(); p != "/d/outbox" {
		t.Fatal(p)
	}
	t.Setenv("PFCOLLECTOR_DATA_DIR", "")
	t.Setenv("XDG_DATA_HOME", "/x")
	if p := DefaultOutboxDir(); p != "/x/pfcollector/outbox" {
		t.Fatal(p)
	}
	t.Setenv("XDG_DATA_HOME", "")
	t.Setenv("HOME", "/home/u")
	if p := DefaultOutboxDir(); p != "/home/u/.local/share/pfcollector/outbox" {
		t.Fatal(p)
	}
}

func TestAHungDaemonStallsOneCrashOnly(t *testing.T) {
	outbox := filepath.Join(shortTempDir(t), "outbox")
	d := newFakeDaemon(t, func(f *fakeConn) {
		f.read()
		f.welcome(map[string]any{"outbox": outbox})
		for { // never acks an event: hung for events, but answers control requests
			m := f.read()
			if m == nil {
				return
			}
			if m["t"] == "control" {
				f.send(map[string]any{"t": "reply", "req": m["req"], "ok": true, "result": map[string]any{}})
			}
		}
	})
	c := testClient(t, d.path, Options{CrashTimeout: 300 * time.Millisecond})
	waitFor(t, "the welcome", c.Connected)
	crash := Event{Fields: map[string]any{"type": "SEGV", "input": []byte("x")}}
	_, err := c.Crash(crash)
	if !errors.Is(err, ErrOutboxed) || !errors.Is(err, ErrTimeout) {
		t.Fatalf("first crash: %v", err)
	}
	_, err = c.Crash(crash)
	if !errors.Is(err, ErrOutboxed) || !errors.Is(err, errHung) {
		t.Fatalf("second crash should not wait for a hung daemon: %v", err)
	}
	if _, err := c.Status(5 * time.Second); err != nil { // it answers again
		t.Fatal(err)
	}
	_, err = c.Crash(crash)
	if !errors.Is(err, ErrOutboxed) || !errors.Is(err, ErrTimeout) {
		t.Fatalf("after an answer a crash waits again: %v", err)
	}
}

func TestADaemonWithoutOutboxKeepsTheCrashQueued(t *testing.T) {
	d := newFakeDaemon(t, func(f *fakeConn) {
		f.read()
		f.welcome(nil) // an older daemon, or one with the outbox disabled
		for f.read() != nil {
		}
	})
	c := testClient(t, d.path, Options{CrashTimeout: 200 * time.Millisecond})
	waitFor(t, "the welcome", c.Connected)
	_, err := c.Crash(Event{Fields: map[string]any{"type": "SEGV", "input": []byte("x")}})
	if !errors.Is(err, ErrNoOutbox) || c.Pending() != 1 {
		t.Fatalf("%v, pending %d", err, c.Pending())
	}
	if files, _ := filepath.Glob(filepath.Join(c.opts.OutboxDir, "*")); len(files) != 0 {
		t.Fatalf("nothing for an outbox the daemon does not read: %v", files)
	}
}
