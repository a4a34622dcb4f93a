package pfclient

// Frames, names and paths of docs/protocol.md as the client needs them.

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"
	"unicode/utf8"
)

// ProtocolVersion is the wire protocol version this client speaks.
const ProtocolVersion = 1

const (
	// DefaultMaxFrame is the daemon's max_frame until its welcome says otherwise.
	DefaultMaxFrame = 16 * 1024 * 1024
	// maxIncomingFrame bounds a daemon->client frame (a status reply is the largest).
	maxIncomingFrame = 16 * 1024 * 1024
	headerSize       = 4
	maxNameChars     = 256
	maxIDChars       = 64
)

// encodeFrame is message as one frame: 4-byte big-endian length, then the msgpack map.
func encodeFrame(message map[string]any) ([]byte, error) {
	b := make([]byte, headerSize, 256)
	b, err := appendMap(b, message)
	if err != nil {
		return nil, err
	}
	binary.BigEndian.PutUint32(b, uint32(len(b)-headerSize))
	return b, nil
}

// DefaultSocketPath is where the daemon listens unless told otherwise:
// $PFCOLLECTOR_SOCKET, else $XDG_RUNTIME_DIR/pfcollector.sock, else
// /tmp/pfcollector-<uid>/pfcollector.sock (a private directory of the user).
func DefaultSocketPath() string {
	if p := os.Getenv("PFCOLLECTOR_SOCKET"); p != "" {
		return p
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "pfcollector.sock")
	}
	return filepath.Join("/tmp", "pfcollector-"+strconv.Itoa(os.Getuid()), "pfcollector.sock")
}

// DefaultOutboxDir is the outbox a client uses when it has no daemon to ask:
// $PFCOLLECTOR_OUTBOX, else the default data directory ($PFCOLLECTOR_DATA_DIR, else
// $XDG_DATA_HOME/pfcollector, else ~/.local/share/pfcollector) + "/outbox".
func DefaultOutboxDir() string {
	if p := os.Getenv("PFCOLLECTOR_OUTBOX"); p != "" {
		return p
	}
	return filepath.Join(defaultDataDir(), "outbox")
}

func defaultDataDir() string {
	if p := os.Getenv("PFCOLLECTOR_DATA_DIR"); p != "" {
		return p
	}
	if p := os.Getenv("XDG_DATA_HOME"); p != "" {
		return filepath.Join(p, "pfcollector")
	}
	home, err := os.UserHomeDir()
	if err != nil || home == "" {
		home = "/"
	}
	return filepath.Join(home, ".local", "share", "pfcollector")
}

// newID is a random UUID4 string (the event ids clients should send).
func newID() string {
	var u [16]byte
	if _, err := rand.Read(u[:]); err != nil {
		// crypto/rand does not fail on Linux; fall back to something unique anyway.
		binary.BigEndian.PutUint64(u[:], uint64(os.Getpid()))
		binary.BigEndian.PutUint64(u[8:], uint64(time.Now().UnixNano()))
	}
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// ValidID reports whether id is 1..64 characters of [A-Za-z0-9._:-].
func ValidID(id string) bool {
	if len(id) == 0 || len(id) > maxIDChars {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			c == '.' || c == '_' || c == ':' || c == '-'
		if !ok {
			return false
		}
	}
	return true
}

// checkName applies the daemon's rule for job_id and fuzzer: 1..256 characters of valid
// UTF-8 without control characters.
func checkName(what, s string) error {
	if s == "" {
		return fmt.Errorf("pfclient: %s must not be empty", what)
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("pfclient: %s %q is not valid UTF-8", what, s)
	}
	if n := utf8.RuneCountInString(s); n > maxNameChars {
		return fmt.Errorf("pfclient: %s is %d characters, at most %d", what, n, maxNameChars)
	}
	for _, r := range s {
		if r < 0x20 || (r >= 0x7f && r <= 0x9f) {
			return fmt.Errorf("pfclient: %s %q holds a control character", what, s)
		}
	}
	return nil
}

// truncateChars cuts s to at most n characters (runes), at a character boundary.
func truncateChars(s string, n int) string {
	if len(s) <= n {
		return s
	}
	count := 0
	for i := range s {
		if count == n {
			return s[:i]
		}
		count++
	}
	return s
}
