package main

import (
	"compress/gzip"
	"context"
	"io"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/stats"
)

// grpc-go 1.33 lets a handler neither see whether a request message was compressed nor
// choose per message whether a response is. The interop cases need both, so this file adds
// them from the outside with public (if old) grpc-go hooks.

// ---- receive side: was the last message of this call compressed? ----

// grpc-go's stats report the wire length including the 5-byte message prefix.
const messagePrefixLen = 5

// recvRecorder remembers whether the last message received on one call was compressed. The
// stats handler sees the length on the wire and the decompressed length; they are equal
// exactly when the message came uncompressed (a gzip stream carries at least 18 bytes of
// framing, so equality for a compressed message would be a coincidence).
type recvRecorder struct {
	mu         sync.Mutex
	compressed bool
}

type recorderKey struct{}

type compressionStats struct{}

func (compressionStats) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context {
	return context.WithValue(ctx, recorderKey{}, &recvRecorder{})
}

// HandleRPC runs on the receiving goroutine before the handler gets the message, so the
// handler always reads the flag of the message it has just received.
func (compressionStats) HandleRPC(ctx context.Context, s stats.RPCStats) {
	in, ok := s.(*stats.InPayload)
	if !ok {
		return
	}
	if rec, ok := ctx.Value(recorderKey{}).(*recvRecorder); ok {
		rec.mu.Lock()
		rec.compressed = in.WireLength-messagePrefixLen != in.Length
		rec.mu.Unlock()
	}
}

func (compressionStats) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}

func (compressionStats) HandleConn(context.Context, stats.ConnStats) {}

// lastRecvCompressed reports whether the most recent message of this call arrived compressed.
func lastRecvCompressed(ctx context.Context) bool {
	rec, ok := ctx.Value(recorderKey{}).(*recvRecorder)
	if !ok {
		return false
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return rec.compressed
}

// ---- send side: compress exactly the responses the request asked to compress ----
//
// The handler marks a response object (compressResponse); the codec, which sees that object,
// passes the mark on to the serialized bytes (keyed by the address of their first byte, unique
// while they are alive); the server-wide compressor then gzips marked bytes and writes nothing
// for the others, which grpc-go sends as an uncompressed message. Response headers therefore
// always say grpc-encoding: gzip, which is allowed: the flag of each message decides.

var (
	marked     sync.Map // response object -> struct{}: compress when sent
	markedData sync.Map // *byte (first byte of its serialization) -> struct{}
)

// compressResponse asks for msg to be sent compressed (if compress is true).
func compressResponse(msg interface{}, compress bool) {
	if compress {
		marked.Store(msg, struct{}{})
	}
}

// markingCodec is the proto codec plus the hand-over of marks from objects to bytes.
type markingCodec struct{ proto encoding.Codec }

func newMarkingCodec() markingCodec { return markingCodec{proto: encoding.GetCodec("proto")} }

func (c markingCodec) Marshal(v interface{}) ([]byte, error) {
	data, err := c.proto.Marshal(v)
	if err != nil {
		return nil, err
	}
	if _, ok := marked.LoadAndDelete(v); ok && len(data) > 0 {
		markedData.Store(&data[0], struct{}{})
	}
	return data, nil
}

func (c markingCodec) Unmarshal(data []byte, v interface{}) error { return c.proto.Unmarshal(data, v) }

func (c markingCodec) String() string { return c.proto.Name() }

// selectiveGzip compresses marked messages only; an empty output makes grpc-go send the
// message uncompressed.
type selectiveGzip struct{ writers sync.Pool }

func (z *selectiveGzip) Do(w io.Writer, p []byte) error {
	if len(p) == 0 {
		return nil
	}
	if _, ok := markedData.LoadAndDelete(&p[0]); !ok {
		return nil
	}
	gw, _ := z.writers.Get().(*gzip.Writer)
	if gw == nil {
		gw = gzip.NewWriter(w)
	} else {
		gw.Reset(w)
	}
	defer z.writers.Put(gw)
	if _, err := gw.Write(p); err != nil {
		return err
	}
	return gw.Close()
}

func (z *selectiveGzip) Type() string { return "gzip" }

// compressionOptions installs both sides on a server.
func compressionOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.StatsHandler(compressionStats{}),
		grpc.CustomCodec(newMarkingCodec()),
		grpc.RPCCompressor(&selectiveGzip{}),
	}
}
