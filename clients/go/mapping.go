package pfclient

// How the PandaFuzz bot's fuzzer events become pfcollector events. The shapes are the ones
// the bot's executor really sends (see docs/pandafuzz-bot.md); anything else in Data is kept
// (lifecycle messages) or ignored, never a panic.

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strings"
	"time"
)

// FuzzerEvent mirrors the bot's common.FuzzerEvent; the bot converts with one literal:
//
//	pfclient.FuzzerEvent{Type: string(ev.Type), Timestamp: ev.Timestamp, JobID: ev.JobID, Data: ev.Data}
type FuzzerEvent struct {
	Type      string
	Timestamp time.Time
	JobID     string
	Data      map[string]interface{}
}

// The bot's event types.
const (
	EventStarted      = "started"
	EventStopped      = "stopped"
	EventCrashFound   = "crash_found"
	EventCorpusUpdate = "corpus_update"
	EventCoverage     = "coverage"
	EventStats        = "stats"
	EventError        = "error"
	EventTimeout      = "timeout"
)

const (
	maxInput       = 10 * 1024 * 1024
	maxTextChars   = 65536
	maxTypeChars   = 256
	maxCorpusFiles = 1024
	maxFileChars   = 4096
)

var (
	// errUnknownType: the event's Type is none of the bot's types (counted by the Collector).
	errUnknownType = errors.New("unknown event type")
	// errProgress: a stats event of the progress variant (phase, progress_percent, ...): the
	// daemon's stats have no such fields, and an all-zero stats event would overwrite the
	// job's real figures, so it is counted and not sent.
	errProgress = errors.New("progress update")
)

// statsFields are the daemon's stats fields: the bot's flat key (and FuzzerStats field name)
// for each, and whether it is a float.
var statsFields = []struct {
	key, field string
	float      bool
}{
	{"executions", "Executions", false},
	{"exec_per_second", "ExecPerSecond", true},
	{"total_edges", "TotalEdges", false},
	{"covered_edges", "CoveredEdges", false},
	{"coverage_percent", "CoveragePercent", true},
	{"unique_crashes", "UniqueCrashes", false},
	{"total_crashes", "TotalCrashes", false},
	{"corpus_size", "CorpusSize", false},
	{"cpu_usage", "CPUUsage", true},
	{"memory_usage", "MemoryUsage", false},
}

// MapEvent turns one bot event into the pfcollector event that carries it. It never panics
// on any Data (a recovered panic is returned as an error).
func MapEvent(ev FuzzerEvent) (out Event, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("pfclient: cannot map %s event: %v", ev.Type, r)
		}
	}()
	out = Event{JobID: ev.JobID, Time: ev.Timestamp}
	data := ev.Data
	switch ev.Type {
	case EventCrashFound:
		return mapCrash(ev, out)
	case EventCorpusUpdate:
		return mapCorpus(data, out)
	case EventCoverage:
		return mapCoverage(data, out)
	case EventStats:
		return mapStats(data, out)
	case EventStarted, EventStopped, EventError, EventTimeout:
		out.Kind = ev.Type
		out.Fields = map[string]any{"message": lifecycleMessage(ev.Type, data)}
		return out, nil
	}
	return out, fmt.Errorf("%w %q", errUnknownType, ev.Type)
}

// mapCrash reads Data["crash"], a *common.CrashResult, by reflection on its exported field
// names (Input is hidden from JSON, so no JSON round trip could carry it).
func mapCrash(ev FuzzerEvent, out Event) (Event, error) {
	data := ev.Data
	var crash map[string]reflect.Value
	if v, ok := data["crash"]; ok {
		crash = structFields(v)
	}
	get := func(field, key string) (any, bool) {
		if f, ok := crash[field]; ok {
			return f.Interface(), true
		}
		v, ok := data[key]
		return v, ok && v != nil
	}
	input, haveInput := get("Input", "input")
	inputBytes, isBytes := asBytes(input)
	typ := "unknown"
	if v, ok := get("Type", "type"); ok {
		if s := asString(v); s != "" {
			typ = s
		}
	}
	botID := ""
	if v, ok := get("ID", "crash_id"); ok {
		botID = asString(v)
	}
	if out.JobID == "" {
		if v, ok := get("JobID", "job_id"); ok {
			out.JobID = asString(v)
		}
	}
	// The crash's own time (AFL: the crash file's mtime) rather than the event's: a crash
	// the bot reports again is then the same event, byte for byte, and stored once.
	if v, ok := get("Timestamp", "timestamp"); ok {
		if t, ok := v.(time.Time); ok && !t.IsZero() {
			out.Time = t
		}
	}
	signal, exitCode := int64(0), int64(0)
	if v, ok := get("Signal", "signal"); ok {
		signal, _ = asInt64(v)
	}
	if v, ok := get("ExitCode", "exit_code"); ok {
		exitCode, _ = asInt64(v)
	}
	if !haveInput || !isBytes || len(inputBytes) == 0 {
		// No input bytes: a crash without them would reach the master with the hash and
		// size of nothing. Deliver what is known as an error event instead.
		hash := ""
		if v, ok := get("Hash", "hash"); ok {
			hash = asString(v)
		}
		out.Kind = EventError
		out.Fields = map[string]any{"message": truncateChars(fmt.Sprintf(
			"crash_found without input bytes: id=%s type=%s signal=%d exit_code=%d hash=%s",
			botID, typ, signal, exitCode, hash), maxTextChars)}
		return out, errNoInput
	}
	if len(inputBytes) > maxInput {
		return out, fmt.Errorf("pfclient: crash input of %d bytes is above the daemon's 10 MiB limit", len(inputBytes))
	}
	fields := map[string]any{
		"type":      truncateChars(typ, maxTypeChars),
		"signal":    signal,
		"exit_code": exitCode,
		"input":     inputBytes,
	}
	for field, key := range map[string]string{"Output": "output", "StackTrace": "stack_trace"} {
		if v, ok := get(field, key); ok {
			fields[key] = truncateChars(asString(v), maxTextChars)
		}
	}
	out.Kind = "crash"
	out.Fields = fields
	out.ID = crashID(out.JobID, botID, inputBytes)
	return out, nil
}

// errNoInput marks a crash_found that carried no input bytes (sent as an error event).
var errNoInput = errors.New("crash without input")

// crashID is a stable event id for a bot crash: the bot's own ids are file names such as
// "id:000000,sig:11,..." that repeat in every job and hold characters ids may not, so the
// id is derived from the job, the bot's id and the input. A crash the bot reports twice
// gets the same id (stored once); the same file name in another job does not collide.
func crashID(jobID, botID string, input []byte) string {
	h := sha256.New()
	h.Write([]byte(jobID))
	h.Write([]byte{0})
	h.Write([]byte(botID))
	h.Write([]byte{0})
	sum := sha256.Sum256(input)
	h.Write(sum[:])
	return "crash-" + hex.EncodeToString(h.Sum(nil))[:40]
}

// mapCorpus: the executor sends flat keys path_id, file_name, size, coverage (edges of that
// path, which the daemon's corpus event has no field for); the fuzzers' base class sends
// files, total_size, corpus_id; a *common.CorpusUpdate under "corpus" is read too.
func mapCorpus(data map[string]any, out Event) (Event, error) {
	var files []string
	var total int64
	if v, ok := data["corpus"]; ok {
		f := structFields(v)
		if x, ok := f["Files"]; ok {
			files = asStrings(x.Interface())
		}
		if x, ok := f["TotalSize"]; ok {
			total, _ = asInt64(x.Interface())
		}
	}
	if len(files) == 0 {
		files = asStrings(data["files"])
	}
	if len(files) == 0 {
		name := asString(data["file_name"])
		if name == "" {
			name = asString(data["path_id"])
		}
		if name != "" {
			files = []string{name}
		}
	}
	if len(files) == 0 {
		return out, errors.New("pfclient: corpus_update without file_name, path_id or files")
	}
	if len(files) > maxCorpusFiles {
		files = files[:maxCorpusFiles]
	}
	for i, f := range files {
		files[i] = truncateChars(f, maxFileChars)
	}
	if total == 0 {
		for _, key := range []string{"size", "total_size"} {
			if n, ok := asInt64(data[key]); ok {
				total = n
				break
			}
		}
	}
	out.Kind = "corpus"
	out.Fields = map[string]any{"files": files, "total_size": total}
	return out, nil
}

func mapCoverage(data map[string]any, out Event) (Event, error) {
	fields := map[string]any{}
	var s map[string]reflect.Value
	if v, ok := data["coverage"]; ok {
		s = structFields(v)
	}
	for key, field := range map[string]string{"edges": "Edges", "new_edges": "NewEdges", "exec_count": "ExecCount"} {
		if f, ok := s[field]; ok {
			if n, ok := asInt64(f.Interface()); ok {
				fields[key] = n
			}
		} else if n, ok := asInt64(data[key]); ok {
			fields[key] = n
		}
	}
	if _, ok := fields["edges"]; !ok {
		return out, errors.New("pfclient: coverage event without edges")
	}
	out.Kind = "coverage"
	out.Fields = fields
	return out, nil
}

func mapStats(data map[string]any, out Event) (Event, error) {
	var s map[string]reflect.Value
	if v, ok := data["stats"]; ok {
		s = structFields(v)
	}
	fields := map[string]any{}
	for _, sf := range statsFields {
		var v any
		if f, ok := s[sf.field]; ok {
			v = f.Interface()
		} else if x, ok := data[sf.key]; ok {
			v = x
		} else {
			continue
		}
		if sf.float {
			if x, ok := asFloat64(v); ok {
				fields[sf.key] = x
			}
		} else if x, ok := asInt64(v); ok {
			fields[sf.key] = x
		}
	}
	if len(fields) == 0 {
		if _, ok := data["phase"]; ok {
			return out, errProgress
		}
		if _, ok := data["progress_percent"]; ok {
			return out, errProgress
		}
	}
	out.Kind = "stats"
	out.Fields = fields
	return out, nil
}

// lifecycleMessage keeps all of Data as text: the main value first (the error, the stop
// reason, the timeout's duration), then every other key as key=value, sorted.
func lifecycleMessage(typ string, data map[string]any) string {
	main := map[string]string{EventError: "error", EventStopped: "reason", EventTimeout: "duration_string"}[typ]
	var parts []string
	if main != "" {
		if v, ok := data[main]; ok {
			parts = append(parts, asString(v))
		}
	}
	keys := make([]string, 0, len(data))
	for k := range data {
		if k != main {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		parts = append(parts, k+"="+asString(data[k]))
	}
	return truncateChars(strings.Join(parts, " "), maxTextChars)
}
