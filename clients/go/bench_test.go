package pfclient

// What HandleEvent costs the bot against a live daemon (local mode, no master):
//
//	PATH=$VENV/bin:$PATH go test -run - -bench . -benchtime 2000x
//
// BenchmarkHandleEventStats: queue one stats event (no wait). BenchmarkHandleEventCrash: one
// crash with a 1 KiB input, until the daemon has it on disk (its group commit).

import (
	"context"
	"fmt"
	"testing"
	"time"
)

func benchCollector(b *testing.B) *Collector {
	b.Helper()
	d := startDaemon(b, "") // local mode: the spool is the store
	c, err := NewCollector(CollectorOptions{SocketPath: d.sock, Logf: quietLog, OutboxDir: d.dataDir + "/outbox"})
	if err != nil {
		b.Fatal(err)
	}
	if err := c.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.Stop() })
	return c
}

func BenchmarkHandleEventStats(b *testing.B) {
	c := benchCollector(b)
	ev := FuzzerEvent{Type: EventStats, JobID: "bench", Data: map[string]interface{}{
		"executions": int64(1), "exec_per_second": 1.0, "coverage_percent": 1.0, "unique_crashes": 0,
		"corpus_size": 1, "cpu_usage": 1.0, "memory_usage": int64(1)}}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := c.HandleEvent(ev); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if err := c.Client().Flush(30 * time.Second); err != nil {
		b.Fatal(err)
	}
}

func BenchmarkHandleEventCrash(b *testing.B) {
	c := benchCollector(b)
	input := make([]byte, 1024)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		copy(input, fmt.Sprintf("bench crash %d", i))
		if err := c.HandleEvent(crashEvent("bench", fmt.Sprintf("id:%06d", i), input)); err != nil {
			b.Fatal(err)
		}
	}
}
