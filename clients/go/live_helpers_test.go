package pfclient

// Real parts for the live tests: `pfcollector dev-master` and `pfcollector serve` started
// from PATH (or $PFCLIENT_TEST_PFCOLLECTOR), each in its own temp dir, stopped at the end of the test.
// Without pfcollector the live tests skip and say why.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"syscall"
	"testing"
	"time"
)

const liveWait = 60 * time.Second // an upper bound for anything to reach the master (the daemon flushes every 0.2 s); a loaded CI box is slow

func pfcollectorBin(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("PFCLIENT_TEST_PFCOLLECTOR"); p != "" {
		return p
	}
	p, err := exec.LookPath("pfcollector")
	if err != nil {
		t.Skip("pfcollector is not on PATH (activate the venv: . .venv/bin/activate, or set PFCLIENT_TEST_PFCOLLECTOR)")
	}
	return p
}

type devMaster struct {
	url string
	cmd *exec.Cmd
}

var listenLine = regexp.MustCompile(`listening on (http://\S+)`)

func startMaster(t testing.TB) *devMaster {
	t.Helper()
	cmd := exec.Command(pfcollectorBin(t), "dev-master", "--port", "0")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting dev-master: %v", err)
	}
	m := &devMaster{cmd: cmd}
	t.Cleanup(func() { stopProcess(cmd) })
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			default:
			}
		}
	}()
	select {
	case line := <-lines:
		match := listenLine.FindStringSubmatch(line)
		if match == nil {
			t.Fatalf("dev-master said %q", line)
		}
		m.url = match[1]
	case <-time.After(30 * time.Second):
		t.Fatal("dev-master did not print its URL")
	}
	return m
}

// rows are the master's stored rows of kind (crash, coverage, corpus, status).
func (m *devMaster) rows(t testing.TB, kind string) []map[string]any {
	t.Helper()
	resp, err := http.Get(m.url + "/_dev/rows?kind=" + kind)
	if err != nil {
		t.Fatalf("asking the master: %v", err)
	}
	defer resp.Body.Close()
	var doc struct {
		Rows []map[string]any `json:"rows"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatalf("master rows: %v", err)
	}
	return doc.Rows
}

// statusBodies are the bodies posted to /results/status for job.
func (m *devMaster) statusBodies(t testing.TB, job string) []map[string]any {
	var out []map[string]any
	for _, r := range m.rows(t, "status") {
		if body, ok := r["body"].(map[string]any); ok && body["job_id"] == job {
			out = append(out, body)
		}
	}
	return out
}

func (m *devMaster) jobRows(t testing.TB, kind, job string) []map[string]any {
	var out []map[string]any
	for _, r := range m.rows(t, kind) {
		if r["job_id"] == job {
			out = append(out, r)
		}
	}
	return out
}

type daemon struct {
	t       testing.TB
	dir     string
	sock    string
	dataDir string
	master  string
	cmd     *exec.Cmd
	exited  chan error
}

func shortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "pfgo") // socket paths must stay under 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func startDaemon(t testing.TB, masterURL string) *daemon {
	t.Helper()
	dir := shortTempDir(t)
	d := &daemon{t: t, dir: dir, sock: filepath.Join(dir, "pf.sock"), dataDir: filepath.Join(dir, "data"), master: masterURL}
	t.Cleanup(d.stop) // first: a start that fails half-way leaves no process behind
	d.start()
	return d
}

func (d *daemon) start() {
	d.t.Helper()
	args := []string{"serve", "--socket", d.sock, "--data-dir", d.dataDir, "--flush-interval", "0.2", "--log-level", "warning"}
	if d.master != "" {
		args = append(args, "--master", d.master, "--bot-id", "go-bot")
	}
	cmd := exec.Command(pfcollectorBin(d.t), args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		d.t.Fatalf("starting the daemon: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	d.cmd, d.exited = cmd, exited // reaped in the background; stop and kill9 wait on it
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := newClient(Options{SocketPath: d.sock, JobID: "probe", Fuzzer: "probe", Timeout: time.Second, Logf: func(string, ...any) {}})
		if err != nil {
			d.t.Fatal(err)
		}
		c.Start()
		_, serr := c.Status(time.Second)
		_ = c.Close()
		if serr == nil {
			break
		}
		select {
		case err := <-exited:
			d.cmd = nil
			d.t.Fatalf("the daemon exited: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("the daemon did not answer status: %v", serr)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (d *daemon) kill9() {
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.exited
	d.cmd = nil
}

func (d *daemon) stop() {
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(20 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.exited
	}
	d.cmd = nil
}

func stopProcess(cmd *exec.Cmd) {
	if cmd.Process == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

// waitFor polls check until it is true or liveWait passes.
func waitFor(t testing.TB, what string, check func() bool) {
	t.Helper()
	deadline := time.Now().Add(liveWait)
	for !check() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", liveWait, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// quietLog is the clients' Logf in tests: stderr with -v, else nothing. (Not t.Logf: a
// client's goroutine may log after its test ended.)
func quietLog(format string, args ...any) {
	if testing.Verbose() {
		fmt.Fprintf(os.Stderr, format+"\n", args...)
	}
}
