// go-bot plays the PandaFuzz bot's executor through pfclient.Collector: a tiny
// coverage-guided fuzzer finds a real crash in a buggy parser and emits the bot's events
// (started, stats, progress, corpus_update, coverage, crash_found with a *CrashResult and
// its input, error, timeout, stopped) with the same Data shapes the bot's executor uses,
// forwarded by an agent loop written like the bot's connectResultCollectorToExecutor.
//
//	go run . [-socket PATH] [-job ID]
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"time"

	"pfcollector.local/pfclient"
)

// CrashResult has the exported fields of the bot's common.CrashResult. The Collector reads
// it by reflection, so the real bot passes its own type unchanged.
type CrashResult struct {
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

// FuzzerType is a named string, as the bot's fuzzer type is.
type FuzzerType string

// parseRecord is the fuzz target: a record parser with a bug behind a 4-byte magic.
func parseRecord(data []byte) (depth int) {
	if len(data) > 0 && data[0] == 'P' {
		depth = 1
		if len(data) > 1 && data[1] == 'F' {
			depth = 2
			if len(data) > 2 && data[2] == 'Z' {
				depth = 3
				if len(data) > 3 && data[3] == '!' {
					length := int(data[3]) // the bug: trusts a length byte
					_ = data[length]       // index out of range
				}
			}
		}
	}
	return depth
}

// run executes the target on one input: its depth, or the panic it raised.
func run(data []byte) (depth int, crashed bool, output, stack string) {
	defer func() {
		if r := recover(); r != nil {
			crashed, output, stack = true, fmt.Sprintf("panic: %v", r), string(debug.Stack())
		}
	}()
	return parseRecord(data), false, "", ""
}

func main() {
	socket := flag.String("socket", pfclient.DefaultSocketPath(), "the pfcollector daemon's socket")
	job := flag.String("job", "go-bot-example", "job id of the events")
	workDir := flag.String("workdir", "", "job work dir for queue/ and crashes/ (default: a temp dir)")
	flag.Parse()
	if *workDir == "" {
		dir, err := os.MkdirTemp("", "go-bot-")
		if err != nil {
			fmt.Fprintln(os.Stderr, "go-bot:", err)
			os.Exit(1)
		}
		defer os.RemoveAll(dir)
		*workDir = dir
	}
	if err := execute(*socket, *job, *workDir); err != nil {
		fmt.Fprintln(os.Stderr, "go-bot:", err)
		os.Exit(1)
	}
}

func execute(socket, jobID, workDir string) error {
	collector, err := pfclient.NewCollector(pfclient.CollectorOptions{SocketPath: socket, Fuzzer: "go-bot"})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := collector.Start(ctx); err != nil {
		return err
	}
	events := make(chan pfclient.FuzzerEvent, 100) // the executor's event channel
	forwarded := make(chan struct{})
	go func() { // the agent's connectResultCollectorToExecutor, with the one changed line
		defer close(forwarded)
		for event := range events {
			if err := collector.HandleEvent(event); err != nil {
				fmt.Printf("warn %s: %v\n", event.Type, err)
			}
		}
	}()
	emit := func(typ string, data map[string]interface{}) {
		events <- pfclient.FuzzerEvent{Type: typ, Timestamp: time.Now(), JobID: jobID, Data: data}
		fmt.Printf("sent %s\n", typ)
	}
	for _, dir := range []string{"queue", "crashes"} {
		if err := os.MkdirAll(filepath.Join(workDir, dir), 0o755); err != nil {
			return err
		}
	}

	emit("started", map[string]interface{}{"fuzzer": "go-bot", "type": FuzzerType("gofuzz")})
	emit("stats", map[string]interface{}{"phase": "fuzzing", "progress_percent": 0.0, "queue_position": 0, "queue_size": 1})

	rng := rand.New(rand.NewSource(1))
	corpus := [][]byte{[]byte("seed")}
	best, execs, crashes := 0, int64(0), 0
	started := time.Now()
	for crashes == 0 && execs < 5_000_000 {
		parent := corpus[rng.Intn(len(corpus))]
		input := append([]byte(nil), parent...)
		for n := 1 + rng.Intn(2); n > 0; n-- {
			pos := rng.Intn(len(input) + 1)
			if pos == len(input) || rng.Intn(4) == 0 {
				input = append(input, 0)
			}
			input[pos] = byte(rng.Intn(256))
		}
		execs++
		depth, crashed, output, stack := run(input)
		if crashed {
			crashes++
			sum := sha256.Sum256(input)
			name := fmt.Sprintf("id:%06d,sig:00,src:%06d,op:havoc", crashes-1, len(corpus)-1)
			if err := os.WriteFile(filepath.Join(workDir, "crashes", name), input, 0o644); err != nil {
				return err
			}
			emit("crash_found", map[string]interface{}{"crash": &CrashResult{
				ID: name, JobID: jobID, BotID: "go-bot", Hash: hex.EncodeToString(sum[:]),
				FilePath: filepath.Join("crashes", name), Type: "panic", Signal: 0, ExitCode: 2,
				Timestamp: time.Now(), Size: int64(len(input)), IsUnique: true, Input: input,
				Output: output, StackTrace: stack,
			}})
			fmt.Printf("crash sha256 %s input %x\n", hex.EncodeToString(sum[:]), input)
			continue
		}
		if depth > best {
			best = depth
			corpus = append(corpus, input)
			name := fmt.Sprintf("id:%06d,src:%06d,op:havoc,+cov", len(corpus)-1, len(corpus)-2)
			if err := os.WriteFile(filepath.Join(workDir, "queue", name), input, 0o644); err != nil {
				return err
			}
			emit("corpus_update", map[string]interface{}{
				"path_id": fmt.Sprintf("%06d", len(corpus)-1), "file_name": name,
				"size": int64(len(input)), "coverage": depth,
			})
			emit("coverage", map[string]interface{}{"edges": best, "new_edges": 1, "exec_count": execs})
		}
	}
	elapsed := time.Since(started).Seconds()
	emit("stats", map[string]interface{}{
		"executions": execs, "exec_per_second": float64(execs) / elapsed, "coverage_percent": float64(best) / 4 * 100,
		"unique_crashes": crashes, "corpus_size": len(corpus), "cpu_usage": 100.0, "memory_usage": int64(8 << 20),
	})
	emit("error", map[string]interface{}{"fuzzer": "go-bot", "error": "dictionary file not found (continuing without)"})
	emit("timeout", map[string]interface{}{"duration_seconds": elapsed, "duration_string": time.Duration(elapsed * float64(time.Second)).String()})
	emit("stopped", map[string]interface{}{"fuzzer": "go-bot", "reason": "found a crash"})
	close(events)
	<-forwarded

	stats := collector.GetStats()
	if err := collector.Stop(); err != nil {
		return fmt.Errorf("stop: %w", err)
	}
	keys := make([]string, 0, len(stats))
	for k := range stats {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Printf("stat %s = %+v\n", k, stats[k])
	}
	return nil
}
