package pfclient

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"math/rand"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestMapCrashReadsTheCrashResultByReflection(t *testing.T) {
	input := []byte{0, 0xff, 'A'}
	ev := crashEvent("job-1", "id:000000,sig:11", input)
	got, err := MapEvent(ev)
	if err != nil {
		t.Fatal(err)
	}
	if got.Kind != "crash" || got.JobID != "job-1" || !ValidID(got.ID) || !strings.HasPrefix(got.ID, "crash-") {
		t.Fatalf("%+v", got)
	}
	want := map[string]any{"type": "segfault", "signal": int64(11), "exit_code": int64(-11), "input": input,
		"output": "segfault in parse_record", "stack_trace": "parse_record at parser.c:12"}
	if !reflect.DeepEqual(got.Fields, want) {
		t.Fatalf("fields %v", got.Fields)
	}
	// Same job, bot id and input: same event id (a re-report is stored once); another job
	// with the same file name: another id.
	again, _ := MapEvent(crashEvent("job-1", "id:000000,sig:11", input))
	if !got.Time.Equal(ev.Data["crash"].(*botCrashResult).Timestamp) {
		t.Fatalf("a crash keeps the CrashResult's time, got %v", got.Time)
	}
	other, _ := MapEvent(crashEvent("job-2", "id:000000,sig:11", input))
	if again.ID != got.ID || other.ID == got.ID {
		t.Fatalf("ids %s %s %s", got.ID, again.ID, other.ID)
	}
	// A struct value (not a pointer) and the job from the CrashResult when the event has none.
	cr := *(ev.Data["crash"].(*botCrashResult))
	byValue, err := MapEvent(FuzzerEvent{Type: EventCrashFound, Data: map[string]interface{}{"crash": cr}})
	if err != nil || byValue.JobID != "job-1" || !bytes.Equal(byValue.Fields["input"].([]byte), input) || !byValue.Time.Equal(cr.Timestamp) {
		t.Fatalf("%+v %v", byValue, err)
	}
}

func TestMapCrashWithoutInputBecomesAnErrorEvent(t *testing.T) {
	// The fuzzers' base class sends flat keys and no input.
	got, err := MapEvent(FuzzerEvent{Type: EventCrashFound, JobID: "j", Data: map[string]interface{}{
		"crash_id": "c1", "hash": "ab", "type": "segfault", "signal": 11, "exit_code": 0, "size": int64(3), "is_unique": true}})
	if !errors.Is(err, errNoInput) || got.Kind != "error" ||
		got.Fields["message"] != "crash_found without input bytes: id=c1 type=segfault signal=11 exit_code=0 hash=ab" {
		t.Fatalf("%+v %v", got, err)
	}
	var nilCrash *botCrashResult
	got, err = MapEvent(FuzzerEvent{Type: EventCrashFound, Data: map[string]interface{}{"crash": nilCrash}})
	if !errors.Is(err, errNoInput) || got.Kind != "error" {
		t.Fatalf("nil crash: %+v %v", got, err)
	}
}

func TestMapFlatShapes(t *testing.T) {
	cases := []struct {
		ev   FuzzerEvent
		kind string
		want map[string]any
	}{
		{FuzzerEvent{Type: EventCorpusUpdate, Data: map[string]interface{}{"path_id": "7", "file_name": "id:000007", "size": int64(99), "coverage": 3}},
			"corpus", map[string]any{"files": []string{"id:000007"}, "total_size": int64(99)}},
		{FuzzerEvent{Type: EventCorpusUpdate, Data: map[string]interface{}{"path_id": "7", "size": 5}},
			"corpus", map[string]any{"files": []string{"7"}, "total_size": int64(5)}},
		{FuzzerEvent{Type: EventCorpusUpdate, Data: map[string]interface{}{"corpus_id": "c", "files": []string{"a", "b"}, "total_size": int64(10), "file_count": 2}},
			"corpus", map[string]any{"files": []string{"a", "b"}, "total_size": int64(10)}},
		{FuzzerEvent{Type: EventCoverage, Data: map[string]interface{}{"edges": 10, "new_edges": int32(2), "exec_count": uint64(5)}},
			"coverage", map[string]any{"edges": int64(10), "new_edges": int64(2), "exec_count": int64(5)}},
		{FuzzerEvent{Type: EventStats, Data: map[string]interface{}{"executions": int64(1), "exec_per_second": 2.5, "coverage_percent": 3,
			"unique_crashes": 4, "corpus_size": 5, "cpu_usage": float32(6.5), "memory_usage": int64(7), "extra": "ignored"}},
			"stats", map[string]any{"executions": int64(1), "exec_per_second": 2.5, "coverage_percent": 3.0,
				"unique_crashes": int64(4), "corpus_size": int64(5), "cpu_usage": 6.5, "memory_usage": int64(7)}},
		{FuzzerEvent{Type: EventStarted, Data: map[string]interface{}{"fuzzer": "afl++", "type": fuzzerType("aflplusplus")}},
			"started", map[string]any{"message": "fuzzer=afl++ type=aflplusplus"}},
		{FuzzerEvent{Type: EventStopped, Data: map[string]interface{}{"reason": "done"}},
			"stopped", map[string]any{"message": "done"}},
		{FuzzerEvent{Type: EventError, Data: map[string]interface{}{"error": "boom", "type": "*errors.errorString"}},
			"error", map[string]any{"message": "boom type=*errors.errorString"}},
		{FuzzerEvent{Type: EventTimeout, Data: map[string]interface{}{"duration_string": "1m0s", "duration_seconds": 60.0}},
			"timeout", map[string]any{"message": "1m0s duration_seconds=60"}},
		{FuzzerEvent{Type: EventTimeout}, "timeout", map[string]any{"message": ""}},
	}
	for _, tc := range cases {
		got, err := MapEvent(tc.ev)
		if err != nil || got.Kind != tc.kind || !reflect.DeepEqual(got.Fields, tc.want) {
			t.Errorf("%s %v: got %s %#v (%v)", tc.ev.Type, tc.ev.Data, got.Kind, got.Fields, err)
		}
	}
}

type fuzzerStats struct {
	Executions      int64
	ExecPerSecond   float64
	TotalEdges      int
	CoveredEdges    int
	CoveragePercent float64
	UniqueCrashes   int
	TotalCrashes    int
	CorpusSize      int
	CPUUsage        float64
	MemoryUsage     int64
	LastCrash       time.Time
}

func TestMapStructShapesTheBotsCollectorExpected(t *testing.T) {
	got, err := MapEvent(FuzzerEvent{Type: EventStats, Data: map[string]interface{}{"stats": &fuzzerStats{Executions: 9, TotalEdges: 100, CPUUsage: 1.5}}})
	if err != nil || got.Fields["executions"] != int64(9) || got.Fields["total_edges"] != int64(100) || got.Fields["cpu_usage"] != 1.5 {
		t.Fatalf("%+v %v", got, err)
	}
}

func TestProgressAndUnknownAreNotSent(t *testing.T) {
	_, err := MapEvent(FuzzerEvent{Type: EventStats, Data: map[string]interface{}{"phase": "x", "progress_percent": 10.0, "queue_position": 1, "queue_size": 2}})
	if !errors.Is(err, errProgress) {
		t.Fatal(err)
	}
	_, err = MapEvent(FuzzerEvent{Type: "new_kind_of_event"})
	if !errors.Is(err, errUnknownType) {
		t.Fatal(err)
	}
}

type stringer struct{ p *int }

func (s stringer) String() string { return hex.EncodeToString([]byte{byte(*s.p)}) } // panics on nil p

// TestMapNeverPanics feeds every type random Data of odd values.
func TestMapNeverPanics(t *testing.T) {
	var nilPtr *botCrashResult
	var nilMap map[string]int
	odd := []any{nil, nilPtr, nilMap, 1.5, math.NaN(), math.Inf(1), -1, uint64(math.MaxUint64), "s", []byte("b"),
		[]int{1}, map[string]any{"x": 1}, struct{ A int }{1}, &botCrashResult{}, make(chan int), func() {}, stringer{},
		errors.New("e"), time.Second, [3]string{"a", "", "c"}, fuzzerType("t"), &fuzzerStats{}}
	keys := []string{"crash", "input", "type", "signal", "files", "file_name", "path_id", "size", "edges", "stats",
		"executions", "exec_per_second", "error", "reason", "phase", "corpus", "coverage", "job_id", "timestamp", "zzz"}
	types := []string{EventStarted, EventStopped, EventCrashFound, EventCorpusUpdate, EventCoverage, EventStats, EventError, EventTimeout, "other"}
	r := rand.New(rand.NewSource(1))
	c := testClient(t, "/nonexistent-dir/pf.sock", Options{Timeout: time.Millisecond, CrashTimeout: time.Millisecond})
	_ = c
	for i := 0; i < 5000; i++ {
		data := map[string]interface{}{}
		for j := r.Intn(5); j > 0; j-- {
			data[keys[r.Intn(len(keys))]] = odd[r.Intn(len(odd))]
		}
		ev := FuzzerEvent{Type: types[r.Intn(len(types))], Data: data}
		if r.Intn(10) == 0 {
			ev.Data = nil
		}
		got, err := MapEvent(ev)
		if err == nil {
			if _, berr := c.build(got); berr != nil {
				t.Fatalf("mapped %v to an event the client cannot encode: %v", data, berr)
			}
		}
	}
}

func TestMsgpackRoundTripAndDocExamples(t *testing.T) {
	m := map[string]any{"t": "event", "seq": int64(1), "neg": int64(-40000), "big": int64(math.MaxInt64), "f": 1.5,
		"s": strings.Repeat("é", 40), "b": bytes.Repeat([]byte{1}, 70000), "arr": []any{"a", int64(2), nil, true},
		"bad": "a\xffb"}
	frame, err := encodeFrame(m)
	if err != nil {
		t.Fatal(err)
	}
	v, err := decodeOne(frame[4:])
	if err != nil {
		t.Fatal(err)
	}
	m["bad"] = "a\uFFFDb" // invalid UTF-8 is sent as U+FFFD
	if !reflect.DeepEqual(v, m) {
		t.Fatalf("round trip %v", v)
	}
	// docs/protocol.md: welcome and error, as the daemon encodes them.
	welcome, _ := hex.DecodeString("84a174a777656c636f6d65a17601a66461656d6f6eb1706663" +
		"6f6c6c6563746f7220302e312e30a96d61785f6672616d65ce01000000")
	v, err = decodeOne(welcome)
	if err != nil || !reflect.DeepEqual(v, map[string]any{"t": "welcome", "v": int64(1), "daemon": "pfcollector 0.1.0", "max_frame": int64(16777216)}) {
		t.Fatalf("welcome %v %v", v, err)
	}
	for _, bad := range []string{"", "c1", "81a174", "84a174", "d4", "92c0", "81c0c0", "ffff"} {
		raw, _ := hex.DecodeString(bad)
		if _, err := decodeOne(raw); err == nil {
			t.Errorf("%s decoded", bad)
		}
	}
}

// The lines docs/pandafuzz-bot.md tells the bot to change, with the bot's types mirrored:
// a named event type, its event struct, and a logrus-like logger.
type botEventType string

type botFuzzerEvent struct {
	Type      botEventType
	Timestamp time.Time
	JobID     string
	Data      map[string]interface{}
}

type logrusLike struct{ lines []string }

func (l *logrusLike) Warnf(format string, args ...interface{}) {
	l.lines = append(l.lines, format)
}

func TestTheBotsChangedLinesCompileAndWork(t *testing.T) {
	logger := &logrusLike{}
	resultCollector, err := NewCollector(CollectorOptions{
		Fuzzer:       "pandafuzz-bot",
		Logf:         logger.Warnf,
		SocketPath:   "/nonexistent-dir/pf.sock", // (test only: no daemon)
		CrashTimeout: time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	event := botFuzzerEvent{Type: "stopped", Timestamp: time.Now(), JobID: "j", Data: map[string]interface{}{"reason": "r"}}
	if err := resultCollector.HandleEvent(FuzzerEvent{
		Type: string(event.Type), Timestamp: event.Timestamp, JobID: event.JobID, Data: event.Data,
	}); err != nil {
		t.Fatal(err)
	}
	if err := resultCollector.Stop(); err == nil {
		t.Fatal("Stop before Start should say so")
	}
}

func TestUnknownTypesAreCountedWithinABound(t *testing.T) {
	c, err := NewCollector(CollectorOptions{SocketPath: "/nonexistent-dir/pf.sock", Logf: quietLog, StatusTimeout: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100; i++ {
		typ := fmt.Sprintf("kind-%d-%s", i, strings.Repeat("x", i)) // up to 110 bytes
		if err := c.HandleEvent(FuzzerEvent{Type: typ}); err == nil || !strings.Contains(err.Error(), "unknown event type") {
			t.Fatalf("%s: %v", typ, err)
		}
	}
	s := c.GetStats()
	types := s["unknown_event_types"].(map[string]int64)
	if s["unknown_events"] != int64(100) || len(types) != maxUnknownTypes+1 || types["(other)"] != 100-maxUnknownTypes {
		t.Fatalf("%v %v", s["unknown_events"], types)
	}
	for name := range types {
		if len(name) > 64 {
			t.Fatalf("name of %d bytes kept", len(name))
		}
	}
	if s["daemon_error"] == "" || s["crash_batch_size"] != int64(0) {
		t.Fatalf("GetStats without a daemon: %v", s)
	}
}
