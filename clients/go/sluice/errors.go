package sluice

import (
	"fmt"
	"strconv"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const (
	// RequestIDKey is the trailing metadata key carrying the server's id for a call.
	RequestIDKey = "x-request-id"
	// PushbackKey is the trailing metadata key of gRFC A6 server pushback, in milliseconds.
	PushbackKey = "grpc-retry-pushback-ms"
)

// Error is a call that ended with a non-OK gRPC status. status.Code(err) and
// status.FromError(err) work on it; errors.As(err, &sluiceErr) gives its fields.
type Error struct {
	Code    codes.Code
	Message string
	// RequestID is the server's id for the call; quote it in bug reports ("" when none came back).
	RequestID string
	// RetryAfter is the server's grpc-retry-pushback-ms (0 when it sent none).
	RetryAfter time.Duration
	status     *status.Status
}

func (e *Error) Error() string {
	return fmt.Sprintf("sluice: %s: %s", e.Code, e.Message)
}

// GRPCStatus lets status.FromError and status.Code read the error.
func (e *Error) GRPCStatus() *status.Status {
	return e.status
}

// fromError turns a gRPC error into an *Error, reading the call's trailers.
func fromError(err error, trailer metadata.MD) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	e := &Error{Code: st.Code(), Message: st.Message(), status: st}
	if ids := trailer.Get(RequestIDKey); len(ids) > 0 {
		e.RequestID = ids[0]
	}
	if ms := trailer.Get(PushbackKey); len(ms) > 0 {
		if n, parseErr := strconv.Atoi(ms[0]); parseErr == nil && n >= 0 {
			e.RetryAfter = time.Duration(n) * time.Millisecond
		}
	}
	return e
}
