package pfclient

// Frames of one event, the hello, and small msgpack helpers for them.

import (
	"encoding/binary"
	"os"
	"time"
)

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
