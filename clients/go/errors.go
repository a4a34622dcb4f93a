package pfclient

import (
	"errors"
	"fmt"
)

var (
	// ErrUnavailable: the daemon cannot be reached (or its connection broke) right now.
	ErrUnavailable = errors.New("pfclient: the pfcollector daemon is not reachable")
	// ErrTimeout: the daemon did not answer within the call's budget.
	ErrTimeout = errors.New("pfclient: no answer from the pfcollector daemon in time")
	// ErrClosed: the client (or collector) was closed.
	ErrClosed = errors.New("pfclient: closed")
	// ErrQueueFull: MaxPending events or MaxPendingBytes are waiting for the daemon's
	// acknowledgement and no room came free within the budget; the event was not queued.
	ErrQueueFull = errors.New("pfclient: too many events waiting for the daemon; event dropped")
	// ErrTooLarge: the event does not fit in one frame of the daemon's max_frame.
	ErrTooLarge = errors.New("pfclient: event larger than the daemon's max_frame")
	// ErrOutboxed: a crash the daemon could not acknowledge was written to the outbox
	// instead; the daemon imports it when it runs again. Returned wrapped in *OutboxedError.
	ErrOutboxed = errors.New("pfclient: crash saved to the outbox")
	// ErrNoOutbox: the daemon that answered has no outbox (it is older than the outbox
	// importer), so a crash it could not acknowledge stays queued in memory only.
	ErrNoOutbox = errors.New("pfclient: the daemon has no outbox; crash kept in memory only")
)

// errHung is the cause recorded for a crash sent to the outbox without waiting because the
// daemon, though connected, did not acknowledge the previous crash in time.
var errHung = errors.New("pfclient: the daemon did not acknowledge the previous crash in time")

// RejectedError is the daemon's refusal of one event (an `error` message naming its seq),
// or of the hello.
type RejectedError struct {
	Code    string // machine-readable, e.g. "wrong_type", "spool_full"
	Message string // the daemon's human-readable text
	Field   string // the offending key, if any
	Seq     int64  // the refused event's seq on its connection (0 if none)
	ID      string // the refused event's id, when known
	Fatal   bool   // the daemon closed the connection after it
}

func (e *RejectedError) Error() string {
	if e.ID != "" {
		return fmt.Sprintf("pfcollector refused event %s: %s: %s", e.ID, e.Code, e.Message)
	}
	return fmt.Sprintf("pfcollector refused: %s: %s", e.Code, e.Message)
}

// retryable reports whether the daemon refused for lack of room, a write error or its
// shutdown (draining), not because of the event itself: such a crash is worth saving in
// the outbox.
func (e *RejectedError) retryable() bool {
	switch e.Code {
	case "spool_full", "disk_full", "spool_write_failed", "draining":
		return true
	}
	return false
}

// OutboxedError says where a crash went when the daemon could not acknowledge it.
// errors.Is(err, ErrOutboxed) is true for it.
type OutboxedError struct {
	ID    string // the event id
	Path  string // the outbox file
	Cause error  // why the daemon did not take it (timeout, unavailable, spool_full, ...)
}

func (e *OutboxedError) Error() string {
	return fmt.Sprintf("pfclient: crash %s saved to the outbox %s (%v)", e.ID, e.Path, e.Cause)
}

// Is makes errors.Is(err, ErrOutboxed) true.
func (e *OutboxedError) Is(target error) bool { return target == ErrOutboxed }

// Unwrap gives the cause.
func (e *OutboxedError) Unwrap() error { return e.Cause }
