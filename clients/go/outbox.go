package pfclient

// The outbox: where a crash goes when the daemon cannot acknowledge it. One file per event,
// <id>.pfev, holding the two frames a client would send on a fresh connection (hello, then
// the event with seq 1). The daemon imports the directory and deletes what it stored.

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
)

// OutboxSuffix ends the name of every outbox file.
const OutboxSuffix = ".pfev"

// WriteOutbox writes one event to dir as <id>.pfev, durably: a temp file (mode 0640,
// O_CREAT|O_EXCL|O_NOFOLLOW) written whole, fsynced, renamed into place, then the directory
// fsynced. hello and event are the two messages (event must carry "id", a valid event id, and
// seq 1). The directory is created (0750) when missing. Returns the file's path.
func WriteOutbox(dir string, hello, event map[string]any) (string, error) {
	id, _ := event["id"].(string)
	if !ValidID(id) {
		return "", fmt.Errorf("pfclient: outbox event needs a valid id, got %q", id)
	}
	first, err := encodeFrame(hello)
	if err != nil {
		return "", err
	}
	second, err := encodeFrame(event)
	if err != nil {
		return "", err
	}
	return writeOutboxBytes(dir, id, append(first, second...))
}

// writeOutboxBytes writes data (the two frames) as dir/<id>.pfev, durably.
func writeOutboxBytes(dir, id string, data []byte) (string, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return "", fmt.Errorf("pfclient: outbox %s: %w", dir, err)
	}
	var rnd [6]byte
	_, _ = rand.Read(rnd[:])
	tmp := filepath.Join(dir, "."+id+"."+strconv.Itoa(os.Getpid())+"."+hex.EncodeToString(rnd[:])+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o640)
	if err != nil {
		return "", fmt.Errorf("pfclient: outbox: %w", err)
	}
	final := filepath.Join(dir, id+OutboxSuffix)
	ok := false
	defer func() {
		if !ok {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return "", fmt.Errorf("pfclient: outbox write: %w", err)
	}
	if err := f.Sync(); err != nil {
		return "", fmt.Errorf("pfclient: outbox fsync: %w", err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("pfclient: outbox close: %w", err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return "", fmt.Errorf("pfclient: outbox rename: %w", err)
	}
	ok = true
	if d, err := os.Open(dir); err == nil {
		err = d.Sync()
		_ = d.Close()
		if err != nil {
			return final, fmt.Errorf("pfclient: outbox directory fsync: %w", err)
		}
	}
	return final, nil
}
