// Command interop_server is an independent (grpc-go) implementation of grpc.testing.TestService.
//
// It exists so the conformance suite can check our Python client and sidecar against a gRPC
// stack we did not write, and so the benchmark has an upstream that costs little CPU. The
// behaviour follows the reference server of grpc's interop test descriptions (SPECS.md §1).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	_ "google.golang.org/grpc/encoding/gzip" // registers "gzip": decompresses requests
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "pymesh/interop/grpc_testing"
)

const (
	echoInitialKey  = "x-grpc-test-echo-initial"
	echoTrailingKey = "x-grpc-test-echo-trailing-bin"
	// Bounds what one request may ask of the server (the reference cases need 314159 bytes).
	maxResponseSize = 4 << 20
	maxIntervalUs   = 10_000_000
)

// checkExpectCompressed fails the call as the reference server does when the client said it
// compressed a message that arrived uncompressed.
func checkExpectCompressed(ctx context.Context, expect *pb.BoolValue) error {
	if expect.GetValue() && !lastRecvCompressed(ctx) {
		return status.Error(codes.InvalidArgument,
			"expect_compressed is true but the request message was not compressed")
	}
	return nil
}

func payloadOfSize(size int32) (*pb.Payload, error) {
	if size < 0 || size > maxResponseSize {
		return nil, status.Errorf(codes.InvalidArgument, "response size %d out of range [0, %d]",
			size, maxResponseSize)
	}
	return &pb.Payload{Type: pb.PayloadType_COMPRESSABLE, Body: make([]byte, size)}, nil
}

func statusFromEcho(s *pb.EchoStatus) error {
	if s == nil || s.GetCode() == 0 {
		return nil
	}
	return status.Error(codes.Code(s.GetCode()), s.GetMessage())
}

// echoMetadata copies the echo keys of the request into the response. On streams the initial
// metadata goes out at once, so a client that waits for headers before sending cannot
// deadlock; on unary calls it goes with the response.
func echoMetadata(ctx context.Context, stream grpc.ServerStream) error {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok {
		return nil
	}
	if v := md.Get(echoInitialKey); len(v) > 0 {
		header := metadata.Pairs(echoInitialKey, v[0])
		var err error
		if stream != nil {
			err = stream.SendHeader(header)
		} else {
			err = grpc.SetHeader(ctx, header)
		}
		if err != nil {
			return err
		}
	}
	if v := md.Get(echoTrailingKey); len(v) > 0 {
		trailer := metadata.Pairs(echoTrailingKey, v[0])
		if stream != nil {
			stream.SetTrailer(trailer)
		} else if err := grpc.SetTrailer(ctx, trailer); err != nil {
			return err
		}
	}
	return nil
}

type testServer struct {
	pb.UnimplementedTestServiceServer
}

func (testServer) EmptyCall(ctx context.Context, _ *pb.Empty) (*pb.Empty, error) {
	if err := echoMetadata(ctx, nil); err != nil {
		return nil, err
	}
	return &pb.Empty{}, nil
}

func (testServer) UnaryCall(ctx context.Context, req *pb.SimpleRequest) (*pb.SimpleResponse, error) {
	if err := echoMetadata(ctx, nil); err != nil {
		return nil, err
	}
	if err := checkExpectCompressed(ctx, req.GetExpectCompressed()); err != nil {
		return nil, err
	}
	if err := statusFromEcho(req.GetResponseStatus()); err != nil {
		return nil, err
	}
	payload, err := payloadOfSize(req.GetResponseSize())
	if err != nil {
		return nil, err
	}
	resp := &pb.SimpleResponse{Payload: payload}
	compressResponse(resp, req.GetResponseCompressed().GetValue())
	return resp, nil
}

func (s testServer) CacheableUnaryCall(ctx context.Context, req *pb.SimpleRequest) (*pb.SimpleResponse, error) {
	return s.UnaryCall(ctx, req)
}

// sendResponses writes one response per ResponseParameters, sleeping interval_us before each.
func sendResponses(ctx context.Context, params []*pb.ResponseParameters,
	send func(*pb.StreamingOutputCallResponse) error) error {
	for _, p := range params {
		if us := p.GetIntervalUs(); us > 0 {
			if us > maxIntervalUs {
				return status.Errorf(codes.InvalidArgument, "interval_us %d above %d", us, maxIntervalUs)
			}
			select {
			case <-time.After(time.Duration(us) * time.Microsecond):
			case <-ctx.Done():
				return status.FromContextError(ctx.Err()).Err()
			}
		}
		payload, err := payloadOfSize(p.GetSize())
		if err != nil {
			return err
		}
		resp := &pb.StreamingOutputCallResponse{Payload: payload}
		compressResponse(resp, p.GetCompressed().GetValue())
		err = send(resp)
		marked.Delete(resp) // in case the send failed before serializing
		if err != nil {
			return err
		}
	}
	return nil
}

func (testServer) StreamingOutputCall(req *pb.StreamingOutputCallRequest,
	stream pb.TestService_StreamingOutputCallServer) error {
	ctx := stream.Context()
	if err := echoMetadata(ctx, stream); err != nil {
		return err
	}
	if err := sendResponses(ctx, req.GetResponseParameters(), stream.Send); err != nil {
		return err
	}
	return statusFromEcho(req.GetResponseStatus())
}

func (testServer) StreamingInputCall(stream pb.TestService_StreamingInputCallServer) error {
	ctx := stream.Context()
	if err := echoMetadata(ctx, stream); err != nil {
		return err
	}
	var total int32
	for {
		req, err := stream.Recv()
		if err == io.EOF {
			return stream.SendAndClose(&pb.StreamingInputCallResponse{AggregatedPayloadSize: total})
		}
		if err != nil {
			return err
		}
		if err := checkExpectCompressed(ctx, req.GetExpectCompressed()); err != nil {
			return err
		}
		total += int32(len(req.GetPayload().GetBody()))
	}
}

func (testServer) FullDuplexCall(stream pb.TestService_FullDuplexCallServer) error {
	ctx := stream.Context()
	if err := echoMetadata(ctx, stream); err != nil {
		return err
	}
	for {
		req, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := statusFromEcho(req.GetResponseStatus()); err != nil {
			return err
		}
		if err := sendResponses(ctx, req.GetResponseParameters(), stream.Send); err != nil {
			return err
		}
	}
}

// HalfDuplexCall buffers every request until the client half-closes, then answers them all.
func (testServer) HalfDuplexCall(stream pb.TestService_HalfDuplexCallServer) error {
	ctx := stream.Context()
	if err := echoMetadata(ctx, stream); err != nil {
		return err
	}
	const maxBuffered = 1000
	var reqs []*pb.StreamingOutputCallRequest
	for {
		req, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		if len(reqs) == maxBuffered {
			return status.Errorf(codes.ResourceExhausted, "more than %d requests buffered", maxBuffered)
		}
		reqs = append(reqs, req)
	}
	for _, req := range reqs {
		if err := statusFromEcho(req.GetResponseStatus()); err != nil {
			return err
		}
		if err := sendResponses(ctx, req.GetResponseParameters(), stream.Send); err != nil {
			return err
		}
	}
	return nil
}

// writeReadyFile publishes the bound address atomically (write a temp file, then rename), so
// a reader never sees a partial JSON object.
func writeReadyFile(path, addr string) error {
	data, err := json.Marshal(map[string]string{"server": addr})
	if err != nil {
		return err
	}
	tmp, err := ioutil.TempFile(filepath.Dir(path), ".ready-*")
	if err != nil {
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func main() {
	port := flag.Int("port", 0, "TCP port on 127.0.0.1 (0 picks a free one)")
	readyFile := flag.String("ready-file", "",
		`once listening, write {"server": "127.0.0.1:PORT"} to this file (atomically)`)
	drain := flag.Duration("drain-timeout", 5*time.Second,
		"on SIGTERM/SIGINT, wait this long for calls in flight before closing them")
	hooks := flag.Bool("compression-hooks", true,
		"check expect_compressed and honour response_compressed (off: plain grpc-go, a little "+
			"cheaper per call, for use as a benchmark upstream)")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	lis, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *port))
	if err != nil {
		log.Fatalf("interop_server: listen: %v", err)
	}
	var opts []grpc.ServerOption
	if *hooks {
		opts = compressionOptions()
	}
	srv := grpc.NewServer(opts...)
	pb.RegisterTestServiceServer(srv, testServer{})
	// grpc.testing.UnimplementedService is deliberately not registered.

	addr := lis.Addr().String()
	if *readyFile != "" {
		if err := writeReadyFile(*readyFile, addr); err != nil {
			log.Fatalf("interop_server: ready file: %v", err)
		}
	}
	log.Printf("interop_server: listening on %s", addr)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		sig := <-sigs
		log.Printf("interop_server: %v: draining for up to %v", sig, *drain)
		drained := make(chan struct{})
		go func() { srv.GracefulStop(); close(drained) }()
		select {
		case <-drained:
		case <-time.After(*drain):
			srv.Stop()
		}
	}()
	// Serve returns as soon as the drain starts; wait for it to finish before exiting.
	if err := srv.Serve(lis); err != nil {
		log.Fatalf("interop_server: serve: %v", err)
	}
	<-stopped
	log.Printf("interop_server: stopped")
}
