package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "pymesh/interop/grpc_testing"
)

// Sizes and values fixed by grpc's interop test descriptions.
const (
	largeRequestSize  = 271828
	largeResponseSize = 314159
	echoInitialKey    = "x-grpc-test-echo-initial"
	echoInitialValue  = "test_initial_metadata_value"
	echoTrailingKey   = "x-grpc-test-echo-trailing-bin"
	simpleStatusText  = "test status message"
	specialStatusText = "\t\ntest with whitespace\r\nand Unicode BMP ☺ and non-BMP 😈\t\n"
)

var (
	echoTrailingValue = string([]byte{0xab, 0xab, 0xab})
	inputSizes        = []int{27182, 8, 1828, 45904}
	outputSizes       = []int{31415, 9, 2653, 58979}
)

func payload(size int) *pb.Payload {
	return &pb.Payload{Type: pb.PayloadType_COMPRESSABLE, Body: make([]byte, size)}
}

func largeRequest() *pb.SimpleRequest {
	return &pb.SimpleRequest{ResponseSize: largeResponseSize, Payload: payload(largeRequestSize)}
}

// checkPayload verifies a response body: the expected size, all zeros.
func checkPayload(what string, p *pb.Payload, size int) error {
	body := p.GetBody()
	if len(body) != size {
		return fmt.Errorf("%s: payload of %d bytes, want %d", what, len(body), size)
	}
	if !bytes.Equal(body, make([]byte, size)) {
		return fmt.Errorf("%s: payload body is not all zeros", what)
	}
	return nil
}

// expectStatus checks that err carries the wanted code (and message, unless msg is nil).
func expectStatus(what string, err error, code codes.Code, msg *string) error {
	st, _ := status.FromError(err)
	if st.Code() != code {
		return fmt.Errorf("%s: got status %v %q, want %v", what, st.Code(), st.Message(), code)
	}
	if msg != nil && st.Message() != *msg {
		return fmt.Errorf("%s: got message %q, want %q", what, st.Message(), *msg)
	}
	return nil
}

func testClient(conn *grpc.ClientConn) pb.TestServiceClient { return pb.NewTestServiceClient(conn) }

func emptyUnary(ctx context.Context, conn *grpc.ClientConn) error {
	resp, err := testClient(conn).EmptyCall(ctx, &pb.Empty{})
	if err != nil {
		return fmt.Errorf("EmptyCall: %v", err)
	}
	if resp == nil {
		return fmt.Errorf("EmptyCall: nil response")
	}
	return nil
}

func largeUnary(ctx context.Context, conn *grpc.ClientConn) error {
	resp, err := testClient(conn).UnaryCall(ctx, largeRequest())
	if err != nil {
		return fmt.Errorf("UnaryCall: %v", err)
	}
	return checkPayload("UnaryCall", resp.GetPayload(), largeResponseSize)
}

func clientCompressedUnary(ctx context.Context, conn *grpc.ClientConn) error {
	client := testClient(conn)
	// Probe: the server must notice that a message said to be compressed was not.
	probe := largeRequest()
	probe.ExpectCompressed = &pb.BoolValue{Value: true}
	_, err := client.UnaryCall(ctx, probe)
	if err := expectStatus("probe (expect_compressed, sent uncompressed)", err,
		codes.InvalidArgument, nil); err != nil {
		return err
	}
	for _, compressed := range []bool{true, false} {
		req := largeRequest()
		req.ExpectCompressed = &pb.BoolValue{Value: compressed}
		var opts []grpc.CallOption
		if compressed {
			opts = append(opts, grpc.UseCompressor("gzip"))
		}
		resp, err := client.UnaryCall(ctx, req, opts...)
		what := fmt.Sprintf("UnaryCall (request compressed=%v)", compressed)
		if err != nil {
			return fmt.Errorf("%s: %v", what, err)
		}
		if err := checkPayload(what, resp.GetPayload(), largeResponseSize); err != nil {
			return err
		}
	}
	return nil
}

func serverCompressedUnary(ctx context.Context, conn *grpc.ClientConn) error {
	client := testClient(conn)
	// grpc-go 1.33 announces the encodings it accepts only on calls it compresses itself;
	// say it here so the server may compress its response.
	ctx = metadata.AppendToOutgoingContext(ctx, "grpc-accept-encoding", "gzip")
	for _, compressed := range []bool{true, false} {
		req := largeRequest()
		req.ResponseCompressed = &pb.BoolValue{Value: compressed}
		callCtx, log := withRecvLog(ctx)
		resp, err := client.UnaryCall(callCtx, req)
		what := fmt.Sprintf("UnaryCall (response_compressed=%v)", compressed)
		if err != nil {
			return fmt.Errorf("%s: %v", what, err)
		}
		if err := checkPayload(what, resp.GetPayload(), largeResponseSize); err != nil {
			return err
		}
		flags := log.flags()
		if len(flags) != 1 || flags[0] != compressed {
			return fmt.Errorf("%s: response message compressed flags %v, want [%v]",
				what, flags, compressed)
		}
	}
	return nil
}

func clientStreaming(ctx context.Context, conn *grpc.ClientConn) error {
	stream, err := testClient(conn).StreamingInputCall(ctx)
	if err != nil {
		return fmt.Errorf("StreamingInputCall: %v", err)
	}
	want := 0
	for _, size := range inputSizes {
		if err := stream.Send(&pb.StreamingInputCallRequest{Payload: payload(size)}); err != nil {
			return fmt.Errorf("StreamingInputCall send %d bytes: %v", size, err)
		}
		want += size
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return fmt.Errorf("StreamingInputCall: %v", err)
	}
	if got := int(resp.GetAggregatedPayloadSize()); got != want {
		return fmt.Errorf("StreamingInputCall: aggregated_payload_size %d, want %d", got, want)
	}
	return nil
}

func serverStreaming(ctx context.Context, conn *grpc.ClientConn) error {
	req := &pb.StreamingOutputCallRequest{}
	for _, size := range outputSizes {
		req.ResponseParameters = append(req.ResponseParameters,
			&pb.ResponseParameters{Size: int32(size)})
	}
	stream, err := testClient(conn).StreamingOutputCall(ctx, req)
	if err != nil {
		return fmt.Errorf("StreamingOutputCall: %v", err)
	}
	for i, size := range outputSizes {
		resp, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("StreamingOutputCall response %d: %v", i, err)
		}
		if err := checkPayload(fmt.Sprintf("response %d", i), resp.GetPayload(), size); err != nil {
			return err
		}
	}
	if _, err := stream.Recv(); err != io.EOF {
		return fmt.Errorf("StreamingOutputCall: after %d responses got %v, want end of stream",
			len(outputSizes), err)
	}
	return nil
}

func pingPong(ctx context.Context, conn *grpc.ClientConn) error {
	stream, err := testClient(conn).FullDuplexCall(ctx)
	if err != nil {
		return fmt.Errorf("FullDuplexCall: %v", err)
	}
	for i := range outputSizes {
		req := &pb.StreamingOutputCallRequest{
			ResponseParameters: []*pb.ResponseParameters{{Size: int32(outputSizes[i])}},
			Payload:            payload(inputSizes[i]),
		}
		if err := stream.Send(req); err != nil {
			return fmt.Errorf("FullDuplexCall send %d: %v", i, err)
		}
		resp, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("FullDuplexCall response %d: %v", i, err)
		}
		if err := checkPayload(fmt.Sprintf("response %d", i), resp.GetPayload(),
			outputSizes[i]); err != nil {
			return err
		}
	}
	if err := stream.CloseSend(); err != nil {
		return fmt.Errorf("FullDuplexCall half-close: %v", err)
	}
	if _, err := stream.Recv(); err != io.EOF {
		return fmt.Errorf("FullDuplexCall: after half-close got %v, want end of stream", err)
	}
	return nil
}

func emptyStream(ctx context.Context, conn *grpc.ClientConn) error {
	stream, err := testClient(conn).FullDuplexCall(ctx)
	if err != nil {
		return fmt.Errorf("FullDuplexCall: %v", err)
	}
	if err := stream.CloseSend(); err != nil {
		return fmt.Errorf("FullDuplexCall half-close: %v", err)
	}
	if resp, err := stream.Recv(); err != io.EOF {
		return fmt.Errorf("FullDuplexCall: got (%v, %v), want end of stream with no responses",
			resp, err)
	}
	return nil
}

// checkEcho verifies that both echo keys came back, initial and trailing.
func checkEcho(what string, header, trailer metadata.MD) error {
	if got := header.Get(echoInitialKey); len(got) != 1 || got[0] != echoInitialValue {
		return fmt.Errorf("%s: initial metadata %s = %q, want [%q]",
			what, echoInitialKey, got, echoInitialValue)
	}
	if got := trailer.Get(echoTrailingKey); len(got) != 1 || got[0] != echoTrailingValue {
		return fmt.Errorf("%s: trailing metadata %s = %q, want [%q]",
			what, echoTrailingKey, got, echoTrailingValue)
	}
	return nil
}

func customMetadata(ctx context.Context, conn *grpc.ClientConn) error {
	client := testClient(conn)
	ctx = metadata.AppendToOutgoingContext(ctx,
		echoInitialKey, echoInitialValue, echoTrailingKey, echoTrailingValue)

	var header, trailer metadata.MD
	resp, err := client.UnaryCall(ctx, largeRequest(), grpc.Header(&header), grpc.Trailer(&trailer))
	if err != nil {
		return fmt.Errorf("UnaryCall: %v", err)
	}
	if err := checkPayload("UnaryCall", resp.GetPayload(), largeResponseSize); err != nil {
		return err
	}
	if err := checkEcho("UnaryCall", header, trailer); err != nil {
		return err
	}

	stream, err := client.FullDuplexCall(ctx)
	if err != nil {
		return fmt.Errorf("FullDuplexCall: %v", err)
	}
	req := &pb.StreamingOutputCallRequest{
		ResponseParameters: []*pb.ResponseParameters{{Size: largeResponseSize}},
		Payload:            payload(largeRequestSize),
	}
	if err := stream.Send(req); err != nil {
		return fmt.Errorf("FullDuplexCall send: %v", err)
	}
	streamResp, err := stream.Recv()
	if err != nil {
		return fmt.Errorf("FullDuplexCall response: %v", err)
	}
	if err := checkPayload("FullDuplexCall", streamResp.GetPayload(), largeResponseSize); err != nil {
		return err
	}
	if err := stream.CloseSend(); err != nil {
		return fmt.Errorf("FullDuplexCall half-close: %v", err)
	}
	if _, err := stream.Recv(); err != io.EOF {
		return fmt.Errorf("FullDuplexCall: after half-close got %v, want end of stream", err)
	}
	header, err = stream.Header()
	if err != nil {
		return fmt.Errorf("FullDuplexCall header: %v", err)
	}
	return checkEcho("FullDuplexCall", header, stream.Trailer())
}

// checkEchoedStatus asks for a status on UnaryCall and FullDuplexCall and checks it comes back.
func checkEchoedStatus(ctx context.Context, conn *grpc.ClientConn, code codes.Code, msg string,
	withStream bool) error {
	client := testClient(conn)
	echo := &pb.EchoStatus{Code: int32(code), Message: msg}
	_, err := client.UnaryCall(ctx, &pb.SimpleRequest{ResponseStatus: echo})
	if err := expectStatus("UnaryCall", err, code, &msg); err != nil {
		return err
	}
	if !withStream {
		return nil
	}
	stream, err := client.FullDuplexCall(ctx)
	if err != nil {
		return fmt.Errorf("FullDuplexCall: %v", err)
	}
	if err := stream.Send(&pb.StreamingOutputCallRequest{ResponseStatus: echo}); err != nil &&
		err != io.EOF { // io.EOF: the server already ended the call; Recv has the status
		return fmt.Errorf("FullDuplexCall send: %v", err)
	}
	if err := stream.CloseSend(); err != nil {
		return fmt.Errorf("FullDuplexCall half-close: %v", err)
	}
	_, err = stream.Recv()
	return expectStatus("FullDuplexCall", err, code, &msg)
}

func statusCodeAndMessage(ctx context.Context, conn *grpc.ClientConn) error {
	return checkEchoedStatus(ctx, conn, codes.Unknown, simpleStatusText, true)
}

func specialStatusMessage(ctx context.Context, conn *grpc.ClientConn) error {
	return checkEchoedStatus(ctx, conn, codes.Unknown, specialStatusText, false)
}

func unimplementedMethod(ctx context.Context, conn *grpc.ClientConn) error {
	_, err := testClient(conn).UnimplementedCall(ctx, &pb.Empty{})
	return expectStatus("TestService/UnimplementedCall", err, codes.Unimplemented, nil)
}

func unimplementedService(ctx context.Context, conn *grpc.ClientConn) error {
	_, err := pb.NewUnimplementedServiceClient(conn).UnimplementedCall(ctx, &pb.Empty{})
	return expectStatus("UnimplementedService/UnimplementedCall", err, codes.Unimplemented, nil)
}

func cancelAfterBegin(ctx context.Context, conn *grpc.ClientConn) error {
	callCtx, cancel := context.WithCancel(ctx)
	stream, err := testClient(conn).StreamingInputCall(callCtx)
	if err != nil {
		cancel()
		return fmt.Errorf("StreamingInputCall: %v", err)
	}
	cancel()
	_, err = stream.CloseAndRecv()
	return expectStatus("StreamingInputCall cancelled before sending", err, codes.Canceled, nil)
}

func cancelAfterFirstResponse(ctx context.Context, conn *grpc.ClientConn) error {
	callCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := testClient(conn).FullDuplexCall(callCtx)
	if err != nil {
		return fmt.Errorf("FullDuplexCall: %v", err)
	}
	req := &pb.StreamingOutputCallRequest{
		ResponseParameters: []*pb.ResponseParameters{{Size: int32(outputSizes[0])}},
		Payload:            payload(inputSizes[0]),
	}
	if err := stream.Send(req); err != nil {
		return fmt.Errorf("FullDuplexCall send: %v", err)
	}
	resp, err := stream.Recv()
	if err != nil {
		return fmt.Errorf("FullDuplexCall first response: %v", err)
	}
	if err := checkPayload("first response", resp.GetPayload(), outputSizes[0]); err != nil {
		return err
	}
	cancel()
	_, err = stream.Recv()
	return expectStatus("FullDuplexCall cancelled after first response", err, codes.Canceled, nil)
}

func timeoutOnSleepingServer(ctx context.Context, conn *grpc.ClientConn) error {
	callCtx, cancel := context.WithTimeout(ctx, time.Millisecond)
	defer cancel()
	stream, err := testClient(conn).FullDuplexCall(callCtx)
	if err != nil {
		// The deadline may expire before the stream is even created.
		return expectStatus("FullDuplexCall with 1 ms deadline", err, codes.DeadlineExceeded, nil)
	}
	err = stream.Send(&pb.StreamingOutputCallRequest{Payload: payload(inputSizes[0])})
	if err != nil && err != io.EOF { // io.EOF: the call already ended; Recv has the status
		return fmt.Errorf("FullDuplexCall send: %v", err)
	}
	_, err = stream.Recv()
	return expectStatus("FullDuplexCall with 1 ms deadline", err, codes.DeadlineExceeded, nil)
}
