package main

import (
	"context"
	"sync"

	"google.golang.org/grpc/stats"
)

// grpc-go 1.33 does not tell the caller whether a response message was compressed. Its stats
// handler does see the length on the wire and the decompressed length, which are equal exactly
// when the message came uncompressed (a gzip stream has at least 18 bytes of framing). A call
// that wants to know puts a *recvLog in its context; the handler appends one flag per message.

// grpc-go's stats report the wire length including the 5-byte message prefix.
const messagePrefixLen = 5

type recvLog struct {
	mu         sync.Mutex
	compressed []bool
}

func (l *recvLog) flags() []bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]bool(nil), l.compressed...)
}

type recvLogKey struct{}

// withRecvLog returns a context whose calls record the compression of each received message.
func withRecvLog(ctx context.Context) (context.Context, *recvLog) {
	l := &recvLog{}
	return context.WithValue(ctx, recvLogKey{}, l), l
}

type compressionStats struct{}

func (compressionStats) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context {
	return ctx
}

func (compressionStats) HandleRPC(ctx context.Context, s stats.RPCStats) {
	in, ok := s.(*stats.InPayload)
	if !ok || !in.Client {
		return
	}
	if l, ok := ctx.Value(recvLogKey{}).(*recvLog); ok {
		l.mu.Lock()
		l.compressed = append(l.compressed, in.WireLength-messagePrefixLen != in.Length)
		l.mu.Unlock()
	}
}

func (compressionStats) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}

func (compressionStats) HandleConn(context.Context, stats.ConnStats) {}
