package pfclient

// The Collector against a live daemon delivering to the reference master: every bot event
// type arrives with the right fields, crash inputs land in the input store, 16 goroutines
// at once, kill -9 of the daemon.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// botCrashResult has the exported fields of the bot's common.CrashResult (same names and
// types, as docs/pandafuzz-bot.md lists them): the Collector must read it by reflection.
type botCrashResult struct {
	ID         string    `json:"id"`
	JobID      string    `json:"job_id"`
	BotID      string    `json:"bot_id"`
	Hash       string    `json:"hash"`
	FilePath   string    `json:"file_path"`
	Type       string    `json:"type"`
	Signal     int       `json:"signal"`
	ExitCode   int       `json:"exit_code"`
	Timestamp  time.Time `json:"timestamp"`
	Size       int64     `json:"size"`
	IsUnique   bool      `json:"is_unique"`
	Input      []byte    `json:"-"`
	Output     string    `json:"output"`
	StackTrace string    `json:"stack_trace"`
}

// fuzzerType is a named string, like the bot's fuzzer.FuzzerType in a started event.
type fuzzerType string

// crashTime is the CrashResult time of every test crash (AFL: the crash file's mtime).
var crashTime = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func crashEvent(job, name string, input []byte) FuzzerEvent {
	sum := sha256.Sum256(input)
	return FuzzerEvent{Type: EventCrashFound, Timestamp: time.Now(), JobID: job, Data: map[string]interface{}{
		"crash": &botCrashResult{
			ID: name, JobID: job, BotID: "bot-1", Hash: hex.EncodeToString(sum[:]),
			FilePath: "crashes/" + name, Type: "segfault", Signal: 11, ExitCode: -11,
			Timestamp: crashTime, Size: int64(len(input)), IsUnique: true, Input: input,
			// Not a sanitizer report: the daemon keys it by its input and passes the type
			// through (a sanitizer report would be bucketed by bug, see docs/pipeline.md).
			Output: "segfault in parse_record", StackTrace: "parse_record at parser.c:12",
		},
	}}
}

// requireOutbox skips a test that needs the daemon's outbox importer when the daemon's
// welcome names no outbox (a daemon from before the importer).
func requireOutbox(t *testing.T, c *Collector) {
	t.Helper()
	waitFor(t, "the welcome", c.Client().Connected)
	if c.Client().welcomeOutbox() == "" {
		t.Skip("this pfcollector has no outbox importer (its welcome names no outbox)")
	}
}

func newLiveCollector(t *testing.T, d *daemon, crashTimeout time.Duration) *Collector {
	t.Helper()
	c, err := NewCollector(CollectorOptions{SocketPath: d.sock, CrashTimeout: crashTimeout, Logf: quietLog,
		OutboxDir: filepath.Join(d.dataDir, "outbox")})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestEveryBotEventTypeReachesTheMaster(t *testing.T) {
	m := startMaster(t)
	d := startDaemon(t, m.url)
	c := newLiveCollector(t, d, 10*time.Second)
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	job := "job-every"
	input := []byte("PFZ\x00\xff\x80\ncrash input bytes")
	now := time.Now()
	events := []FuzzerEvent{
		{Type: EventStarted, Timestamp: now, JobID: job, Data: map[string]interface{}{"fuzzer": "afl++", "type": fuzzerType("aflplusplus")}},
		{Type: EventStats, Timestamp: now, JobID: job, Data: map[string]interface{}{
			"executions": int64(123456), "exec_per_second": 8500.5, "coverage_percent": 37.5,
			"unique_crashes": 2, "corpus_size": 312, "cpu_usage": 99.5, "memory_usage": int64(1 << 20)}},
		{Type: EventStats, Timestamp: now, JobID: job, Data: map[string]interface{}{
			"phase": "fuzzing", "progress_percent": 50.0, "queue_position": 3, "queue_size": 10}},
		{Type: EventCorpusUpdate, Timestamp: now, JobID: job, Data: map[string]interface{}{
			"path_id": "000042", "file_name": "id:000042,src:000001,op:havoc", "size": int64(2048), "coverage": 17}},
		{Type: EventCoverage, Timestamp: now, JobID: job, Data: map[string]interface{}{
			"coverage_id": "cov-1", "edges": 1500, "new_edges": 3, "exec_count": int64(99)}},
		crashEvent(job, "id:000000,sig:11,src:000000,op:havoc", input),
		crashEvent(job, "id:000000,sig:11,src:000000,op:havoc", input), // reported again: stored once
		{Type: EventError, Timestamp: now, JobID: job, Data: map[string]interface{}{"fuzzer": "afl++", "error": "target binary missing"}},
		{Type: EventTimeout, Timestamp: now, JobID: job, Data: map[string]interface{}{"duration_seconds": 3600.0, "duration_string": "1h0m0s"}},
		{Type: EventStopped, Timestamp: now, JobID: job, Data: map[string]interface{}{"fuzzer": "afl++", "reason": "completed"}},
		{Type: "mystery", Timestamp: now, JobID: job, Data: map[string]interface{}{"x": 1}},
	}
	for _, ev := range events {
		err := c.HandleEvent(ev)
		if ev.Type == "mystery" {
			if err == nil || !strings.Contains(err.Error(), "unknown event type") {
				t.Fatalf("unknown type: got %v", err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", ev.Type, err)
		}
	}
	if err := c.Client().Flush(10 * time.Second); err != nil {
		t.Fatal(err)
	}

	// The crash reported twice has one id: one row (MapEvent's tests check the id itself).
	waitFor(t, "the crash", func() bool { return len(m.jobRows(t, "crash", job)) == 1 })
	crash := m.jobRows(t, "crash", job)[0]
	sum := sha256.Sum256(input)
	want := hex.EncodeToString(sum[:])
	if crash["hash"] != want || crash["size"] != float64(len(input)) || crash["type"] != "segfault" ||
		crash["signal"] != float64(11) || crash["exit_code"] != float64(-11) {
		t.Fatalf("crash row %v", crash)
	}
	if crash["output"] != "segfault in parse_record" || crash["stack_trace"] != "parse_record at parser.c:12" {
		t.Fatalf("crash text %v", crash)
	}
	if crash["bot_id"] != "go-bot" || !strings.HasPrefix(crash["id"].(string), "crash-") {
		t.Fatalf("crash ids %v", crash)
	}
	// The file is written off the ack path (by the daemon's input writer process): it can
	// appear a little after the master has the crash.
	var stored []byte
	waitFor(t, "the input file", func() bool {
		var err error
		stored, err = os.ReadFile(crash["file_path"].(string))
		return err == nil
	})
	if got := sha256.Sum256(stored); hex.EncodeToString(got[:]) != want {
		t.Fatalf("input store holds %x", stored)
	}

	waitFor(t, "the corpus update", func() bool { return len(m.jobRows(t, "corpus", job)) == 1 })
	corpus := m.jobRows(t, "corpus", job)[0]
	if fmt.Sprint(corpus["files"]) != "[id:000042,src:000001,op:havoc]" || corpus["total_size"] != float64(2048) {
		t.Fatalf("corpus row %v", corpus)
	}
	waitFor(t, "coverage", func() bool { return len(m.jobRows(t, "coverage", job)) == 1 })
	cov := m.jobRows(t, "coverage", job)[0]
	if cov["edges"] != float64(1500) || cov["new_edges"] != float64(3) || cov["exec_count"] != float64(99) {
		t.Fatalf("coverage row %v", cov)
	}

	byType := func() map[string]map[string]any {
		out := map[string]map[string]any{}
		for _, b := range m.statusBodies(t, job) {
			out[fmt.Sprint(b["type"])] = b
		}
		return out
	}
	waitFor(t, "stats and lifecycle", func() bool { return len(byType()) == 5 })
	got := byType()
	stats := got["fuzzer_stats"]
	for k, v := range map[string]float64{"executions": 123456, "exec_per_second": 8500.5, "coverage_percent": 37.5,
		"unique_crashes": 2, "corpus_size": 312, "cpu_usage": 99.5, "memory_usage": 1 << 20} {
		if stats[k] != v {
			t.Fatalf("stats %s = %v, want %v (%v)", k, stats[k], v, stats)
		}
	}
	for typ, msg := range map[string]string{
		"started": "fuzzer=afl++ type=aflplusplus",
		"stopped": "completed fuzzer=afl++",
		"error":   "target binary missing fuzzer=afl++",
		"timeout": "1h0m0s duration_seconds=3600",
	} {
		if got[typ]["message"] != msg || got[typ]["fuzzer"] != DefaultCollectorFuzzer {
			t.Fatalf("%s body %v, want message %q", typ, got[typ], msg)
		}
	}

	stats2 := c.GetStats()
	if stats2["unknown_events"] != int64(1) || stats2["progress_updates"] != int64(1) ||
		stats2["batch_size_limit"] != 100 || stats2["flush_interval"] != 200*time.Millisecond ||
		stats2["daemon_error"] != "" || stats2["event_queue_cap"] != DefaultMaxPending {
		t.Fatalf("GetStats %v", stats2)
	}
	if n := stats2["unknown_event_types"].(map[string]int64)["mystery"]; n != 1 {
		t.Fatalf("unknown types %v", stats2["unknown_event_types"])
	}
	c.SetBatchSize(50)
	c.SetFlushInterval(300 * time.Millisecond)
	c.SetBatchSize(0) // ignored
	stats3 := c.GetStats()
	if stats3["batch_size_limit"] != 50 || stats3["flush_interval"] != 300*time.Millisecond {
		t.Fatalf("after tune: %v", stats3)
	}
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := c.Stop(); err == nil {
		t.Fatal("a second Stop should say it was not running")
	}
}

func TestHandleEventFrom16Goroutines(t *testing.T) {
	m := startMaster(t)
	d := startDaemon(t, m.url)
	c := newLiveCollector(t, d, 15*time.Second)
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	const workers, each = 16, 20
	job := "job-16"
	var wg sync.WaitGroup
	errs := make(chan error, workers*each*3)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < each; i++ {
				name := fmt.Sprintf("w%02d-%03d", w, i)
				for _, ev := range []FuzzerEvent{
					crashEvent(job, name, []byte("input "+name)),
					{Type: EventCorpusUpdate, JobID: job, Data: map[string]interface{}{"path_id": name, "file_name": name, "size": int64(i), "coverage": i}},
					{Type: EventStats, JobID: job, Data: map[string]interface{}{"executions": int64(i), "exec_per_second": 1.5}},
				} {
					if err := c.HandleEvent(ev); err != nil {
						errs <- fmt.Errorf("%s %s: %w", name, ev.Type, err)
					}
				}
				_ = c.GetStats()
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "every crash and corpus entry", func() bool {
		return len(m.jobRows(t, "crash", job)) == workers*each && len(m.jobRows(t, "corpus", job)) == workers*each
	})
	for _, r := range m.jobRows(t, "crash", job) {
		if r["type"] != "segfault" {
			t.Fatalf("crash row %v", r)
		}
	}
}

func TestKill9OfTheDaemonLosesNoCrash(t *testing.T) {
	m := startMaster(t)
	d := startDaemon(t, m.url)
	// A crash waits up to 30 s for its acknowledgement: long enough for the restart below.
	c := newLiveCollector(t, d, 30*time.Second)
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	job := "job-kill9"
	const senders, each = 8, 30
	var wantMu sync.Mutex
	want := map[string]bool{}
	sent := make(chan int, senders*each)
	errs := make(chan error, senders)
	var wg sync.WaitGroup
	for w := 0; w < senders; w++ { // several crashes in flight when the daemon dies
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < each; i++ {
				ev := crashEvent(job, fmt.Sprintf("id:%06d", w*each+i), []byte(fmt.Sprintf("kill9 input %d/%d", w, i)))
				mapped, _ := MapEvent(ev)
				wantMu.Lock()
				want[mapped.ID] = true
				wantMu.Unlock()
				// ErrNoOutbox (a daemon without the outbox importer): kept in memory, resent.
				if err := c.HandleEvent(ev); err != nil && !errors.Is(err, ErrNoOutbox) {
					errs <- fmt.Errorf("crash %d/%d: %w", w, i, err)
					return
				}
				sent <- i
			}
		}(w)
	}
	for i := 0; i < senders*each/3; i++ {
		<-sent
	}
	d.kill9()
	time.Sleep(300 * time.Millisecond)
	d.start()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	total := senders * each
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	missing := func() []string {
		got := map[string]bool{}
		for _, r := range m.jobRows(t, "crash", job) {
			got[r["id"].(string)] = true
		}
		var out []string
		for id := range want {
			if !got[id] {
				out = append(out, id)
			}
		}
		return out
	}
	deadline := time.Now().Add(liveWait)
	for len(missing()) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if lost := missing(); len(lost) > 0 {
		files, _ := filepath.Glob(filepath.Join(d.dataDir, "outbox", "*"))
		rejected, _ := filepath.Glob(filepath.Join(d.dataDir, "outbox", "rejected", "*"))
		t.Fatalf("%d of %d crashes not at the master: %v; outbox %v, rejected %v; client %+v",
			len(lost), total, lost, files, rejected, c.Client().Stats())
	}
	// Crashes sent while the daemon was down went to the outbox at once (no stall for
	// the bot) and were imported: either way, none is lost.
	t.Logf("crashes through the outbox: %v", c.GetStats()["crashes_outboxed"])
}

func TestCrashGoesToTheOutboxWhileTheDaemonIsDown(t *testing.T) {
	m := startMaster(t)
	d := startDaemon(t, m.url)
	outbox := filepath.Join(d.dataDir, "outbox")
	job := "job-outbox"

	// One collector learnt the outbox from the daemon's welcome; the other never saw a
	// daemon and uses its OutboxDir option.
	c := newLiveCollector(t, d, 300*time.Millisecond)
	c.opts.StopTimeout = 500 * time.Millisecond
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	requireOutbox(t, c)
	if got := c.Client().welcomeOutbox(); got != outbox {
		t.Fatalf("welcome outbox %q, want %q", got, outbox)
	}
	d.kill9()

	first := []byte("first crash, daemon gone")
	if err := c.HandleEvent(crashEvent(job, "id:000001,sig:06", first)); err != nil {
		t.Fatalf("an outboxed crash is saved, HandleEvent should say nil: %v", err)
	}
	fresh, err := NewCollector(CollectorOptions{SocketPath: d.sock, CrashTimeout: 300 * time.Millisecond,
		StopTimeout: 300 * time.Millisecond, OutboxDir: outbox, Logf: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	if err := fresh.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	second := []byte("second crash, no daemon ever")
	if err := fresh.HandleEvent(crashEvent(job, "id:000002,sig:11", second)); err != nil {
		t.Fatal(err)
	}
	for _, col := range []*Collector{c, fresh} {
		if s := col.GetStats(); s["crashes_outboxed"] != int64(1) || s["daemon_error"] == "" {
			t.Fatalf("GetStats %v", s)
		}
	}
	files, _ := filepath.Glob(filepath.Join(outbox, "*.pfev"))
	if len(files) != 2 {
		t.Fatalf("outbox holds %v", files)
	}
	for _, f := range files {
		info, err := os.Stat(f)
		if err != nil || info.Mode().Perm() != 0o640 {
			t.Fatalf("%s: %v %v", f, info.Mode(), err)
		}
	}
	// Stop with the daemon still away: nothing is left in memory to lose.
	for _, col := range []*Collector{c, fresh} {
		if err := col.Stop(); err != nil {
			t.Fatal(err)
		}
	}

	d.start() // imports the outbox
	waitFor(t, "both crashes at the master", func() bool { return len(m.jobRows(t, "crash", job)) == 2 })
	for _, r := range m.jobRows(t, "crash", job) {
		stored, err := os.ReadFile(r["file_path"].(string))
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(stored)
		if r["hash"] != hex.EncodeToString(sum[:]) || (string(stored) != string(first) && string(stored) != string(second)) {
			t.Fatalf("crash %v holds %q", r, stored)
		}
	}
	waitFor(t, "the outbox to empty", func() bool {
		files, _ := filepath.Glob(filepath.Join(outbox, "*.pfev"))
		return len(files) == 0
	})
}

func TestAHungDaemonCostsOneCrashTimeoutAndLosesNothing(t *testing.T) {
	m := startMaster(t)
	d := startDaemon(t, m.url)
	c := newLiveCollector(t, d, 500*time.Millisecond)
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	job := "job-hung"
	requireOutbox(t, c)
	if err := c.HandleEvent(crashEvent(job, "id:000000", []byte("before the stop"))); err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	defer func() {
		if stopped {
			_ = d.cmd.Process.Signal(syscall.SIGCONT)
		}
	}()
	// The first crash waits CrashTimeout, the others go to the outbox at once; the frames
	// already written stay in the socket buffer for the daemon to read when it wakes.
	for i := 1; i <= 3; i++ {
		if err := c.HandleEvent(crashEvent(job, fmt.Sprintf("id:%06d", i), []byte(fmt.Sprintf("while stopped %d", i)))); err != nil {
			t.Fatal(err)
		}
	}
	if s := c.GetStats(); s["crashes_outboxed"] != int64(3) {
		t.Fatalf("GetStats %v", s)
	}
	_ = d.cmd.Process.Signal(syscall.SIGCONT)
	stopped = false
	// Each crash may reach the daemon twice (socket and outbox), under one id.
	waitFor(t, "4 crashes at the master", func() bool { return len(m.jobRows(t, "crash", job)) == 4 })
	waitFor(t, "the outbox to empty", func() bool {
		files, _ := filepath.Glob(filepath.Join(d.dataDir, "outbox", "*.pfev"))
		return len(files) == 0
	})
	// (A copy that arrives after the first was delivered is delivered again: the master
	// keeps one row per id.)
	ids := map[any]bool{}
	for _, r := range m.jobRows(t, "crash", job) {
		ids[r["id"]] = true
	}
	if len(ids) != 4 {
		t.Fatalf("crash rows %v", m.jobRows(t, "crash", job))
	}
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
}
