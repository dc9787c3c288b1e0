// Command loadgen drives grpc.testing.TestService/UnaryCall for the benchmark, from outside
// Python so the generator does not compete with the proxy under test for the interpreter.
//
// Closed loop (--rate 0): --concurrency workers each send the next call as soon as the last
// one returns: this measures maximum throughput. Fixed rate (--rate R): calls are scheduled
// at R per second whatever the server does, and a call that waits for a free worker has that
// wait in its latency, so a stalled server shows up in the percentiles instead of silently
// slowing the generator down ("coordinated omission"; see dispatch). Every response's gRPC status is
// checked, and OK responses must carry the requested payload size.
//
// Output: one JSON object on stdout (see result). Exit status 0 when the run completed, even
// with failed calls (they are counted); 1 when it could not run; 2 on bad flags.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "pymesh/interop/grpc_testing"
)

type config struct {
	target         string
	concurrency    int
	connections    int
	duration       time.Duration
	warmup         time.Duration
	rate           float64
	payloadSize    int
	responseSize   int
	callTimeout    time.Duration
	connectTimeout time.Duration
	maxRequests    int64
}

const (
	maxDuration    = 10 * time.Minute
	maxWarmup      = time.Minute
	maxConcurrency = 10000
	maxConnections = 1000
	maxRate        = 1000000
)

func parseFlags() (config, int) {
	var c config
	var durationS, warmupS float64
	var procs int
	flag.StringVar(&c.target, "target", "", "HOST:PORT serving grpc.testing.TestService (required)")
	flag.IntVar(&c.concurrency, "concurrency", 16, "calls in flight at most (workers)")
	flag.IntVar(&c.connections, "connections", 1, "HTTP/2 connections; workers share them round robin")
	flag.Float64Var(&durationS, "duration", 10, "measured seconds, after the warm-up (at most 600)")
	flag.Float64Var(&warmupS, "warmup", 1, "seconds of load before measuring (at most 60)")
	flag.Float64Var(&c.rate, "rate", 0, "calls per second; 0 = closed loop, as fast as possible")
	flag.IntVar(&c.payloadSize, "payload-size", 100, "request payload bytes")
	flag.IntVar(&c.responseSize, "response-size", 100, "response payload bytes asked for")
	flag.DurationVar(&c.callTimeout, "call-timeout", 5*time.Second, "deadline of each call")
	flag.DurationVar(&c.connectTimeout, "connect-timeout", 10*time.Second, "time allowed to connect")
	flag.Int64Var(&c.maxRequests, "max-requests", 0, "stop after this many calls, warm-up included (0 = no limit)")
	flag.IntVar(&procs, "procs", 0, "GOMAXPROCS (0 = Go's default, all cores)")
	flag.Parse()

	c.duration = time.Duration(durationS * float64(time.Second))
	c.warmup = time.Duration(warmupS * float64(time.Second))
	var problems []string
	if c.target == "" {
		problems = append(problems, "--target is required")
	}
	if c.concurrency < 1 || c.concurrency > maxConcurrency {
		problems = append(problems, fmt.Sprintf("--concurrency must be in [1, %d]", maxConcurrency))
	}
	if c.connections < 1 || c.connections > maxConnections {
		problems = append(problems, fmt.Sprintf("--connections must be in [1, %d]", maxConnections))
	}
	if c.duration <= 0 || c.duration > maxDuration {
		problems = append(problems, fmt.Sprintf("--duration must be in (0, %v]", maxDuration.Seconds()))
	}
	if c.warmup < 0 || c.warmup > maxWarmup {
		problems = append(problems, fmt.Sprintf("--warmup must be in [0, %v]", maxWarmup.Seconds()))
	}
	if c.rate < 0 || c.rate > maxRate {
		problems = append(problems, fmt.Sprintf("--rate must be in [0, %d]", maxRate))
	}
	if c.payloadSize < 0 || c.responseSize < 0 {
		problems = append(problems, "payload sizes must be >= 0")
	}
	if c.callTimeout <= 0 || c.connectTimeout <= 0 {
		problems = append(problems, "timeouts must be > 0")
	}
	if len(problems) > 0 {
		for _, p := range problems {
			fmt.Fprintln(os.Stderr, "loadgen:", p)
		}
		return c, 2
	}
	if procs > 0 {
		runtime.GOMAXPROCS(procs)
	}
	return c, 0
}

// tally is one worker's record of the measured window; merged at the end, never shared.
type tally struct {
	latency *histogram // successful calls only
	ok      int64
	errors  map[string]int64
}

func newTally() *tally { return &tally{latency: newHistogram(), errors: map[string]int64{}} }

// window is the measured part of the run: calls that complete in [from, to) count.
type window struct{ from, to time.Time }

func (w window) contains(t time.Time) bool { return !t.Before(w.from) && t.Before(w.to) }

type worker struct {
	cfg    *config
	client pb.TestServiceClient
	req    *pb.SimpleRequest // per worker: marshalling writes the message's size cache
	tally  *tally
}

// call sends one UnaryCall and, if it completes inside the window, records its outcome with
// the latency counted from release.
func (w *worker) call(win window, release time.Time) {
	ctx, cancel := context.WithTimeout(context.Background(), w.cfg.callTimeout)
	resp, err := w.client.UnaryCall(ctx, w.req)
	cancel()
	done := time.Now()
	if !win.contains(done) {
		return
	}
	t := w.tally
	switch {
	case err != nil:
		t.errors[codeName(status.Code(err))]++
	case len(resp.GetPayload().GetBody()) != w.cfg.responseSize:
		t.errors["BAD_RESPONSE"]++
	default:
		t.ok++
		t.latency.record(done.Sub(release))
	}
}

// startedTotal counts the calls sent (warm-up included), for --max-requests and "unsent".
var startedTotal int64

func reserveCall(max int64) bool {
	if n := atomic.AddInt64(&startedTotal, 1); max > 0 && n > max {
		atomic.AddInt64(&startedTotal, -1)
		return false
	}
	return true
}

func (w *worker) closedLoop(win window) {
	for {
		now := time.Now()
		if !now.Before(win.to) || !reserveCall(w.cfg.maxRequests) {
			return
		}
		w.call(win, now)
	}
}

func (w *worker) fixedRate(win window, schedule <-chan time.Time) {
	for release := range schedule {
		if !time.Now().Before(win.to) || !reserveCall(w.cfg.maxRequests) {
			continue // past the end: left unsent, counted by the caller
		}
		w.call(win, release)
	}
}

// dispatch releases the calls scheduled at start + i/rate until end, sending on out the time
// each call's latency counts from. Go's timers wake up to about a millisecond late; while the
// generator keeps up, a call is released when the dispatcher actually woke for it, so that
// lateness of ours is not charged to the server. Once every
// worker is busy (the server is slow), the dispatcher blocks and the calls it then releases
// keep their scheduled times: the queueing the server caused is charged to it.
func dispatch(start time.Time, rate float64, end time.Time, out chan<- time.Time) {
	defer close(out)
	interval := time.Duration(float64(time.Second) / rate)
	ended := time.NewTimer(time.Until(end))
	defer ended.Stop()
	behind := false
	for i := int64(0); ; i++ {
		next := start.Add(time.Duration(i) * interval)
		if !next.Before(end) {
			return
		}
		now := time.Now()
		if next.After(now) {
			behind = false
			time.Sleep(next.Sub(now))
			now = time.Now()
		}
		release := now
		if behind {
			release = next
		}
		select {
		case out <- release:
			continue
		default:
		}
		behind = true
		select {
		case out <- next:
		case <-ended.C:
			return
		}
	}
}

// scheduledBefore counts the send times start + i/rate before end.
func scheduledBefore(start time.Time, rate float64, end time.Time) int64 {
	interval := time.Duration(float64(time.Second) / rate)
	if !end.After(start) {
		return 0
	}
	return int64((end.Sub(start) + interval - 1) / interval)
}

type latencyMs struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

type result struct {
	Target      string           `json:"target"`
	Mode        string           `json:"mode"` // "closed_loop" or "fixed_rate"
	Rate        float64          `json:"rate"`
	Concurrency int              `json:"concurrency"`
	Connections int              `json:"connections"`
	WarmupS     float64          `json:"warmup_s"`
	DurationS   float64          `json:"duration_s"`
	Requests    int64            `json:"requests"` // completed in the window: ok + errors
	OK          int64            `json:"ok"`
	Errors      map[string]int64 `json:"errors"` // by gRPC code name; BAD_RESPONSE = OK, wrong size
	Unsent      int64            `json:"unsent"` // fixed rate: scheduled before the end, never sent
	RPS         float64          `json:"rps"`    // completed calls per second of the window
	LatencyMs   latencyMs        `json:"latency_ms"`
}

func round3(v float64) float64 { return float64(int64(v*1000+0.5)) / 1000 }

func dial(cfg *config) ([]*grpc.ClientConn, error) {
	conns := make([]*grpc.ClientConn, 0, cfg.connections)
	for i := 0; i < cfg.connections; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), cfg.connectTimeout)
		// Each ClientConn is its own HTTP/2 connection; WithBlock keeps connection set-up
		// out of the measurement.
		conn, err := grpc.DialContext(ctx, cfg.target, grpc.WithInsecure(), grpc.WithBlock())
		cancel()
		if err != nil {
			for _, c := range conns {
				c.Close()
			}
			return nil, fmt.Errorf("connect to %s: %v", cfg.target, err)
		}
		conns = append(conns, conn)
	}
	return conns, nil
}

func run(cfg *config) (*result, error) {
	conns, err := dial(cfg)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()

	workers := make([]*worker, cfg.concurrency)
	for i := range workers {
		workers[i] = &worker{
			cfg:    cfg,
			client: pb.NewTestServiceClient(conns[i%len(conns)]),
			req: &pb.SimpleRequest{
				ResponseSize: int32(cfg.responseSize),
				Payload: &pb.Payload{Type: pb.PayloadType_COMPRESSABLE,
					Body: make([]byte, cfg.payloadSize)},
			},
			tally: newTally(),
		}
	}

	start := time.Now()
	win := window{from: start.Add(cfg.warmup), to: start.Add(cfg.warmup + cfg.duration)}
	var wg sync.WaitGroup
	var schedule chan time.Time
	if cfg.rate > 0 {
		schedule = make(chan time.Time, cfg.concurrency)
		go dispatch(start, cfg.rate, win.to, schedule)
	}
	for _, w := range workers {
		wg.Add(1)
		go func(w *worker) {
			defer wg.Done()
			if schedule != nil {
				w.fixedRate(win, schedule)
			} else {
				w.closedLoop(win)
			}
		}(w)
	}
	wg.Wait()
	// With --max-requests the run may end early: measure over the time actually used.
	if finished := time.Now(); finished.Before(win.to) {
		win.to = finished
	}

	total := newTally()
	for _, w := range workers {
		total.latency.merge(w.tally.latency)
		total.ok += w.tally.ok
		for code, n := range w.tally.errors {
			total.errors[code] += n
		}
	}
	res := &result{
		Target: cfg.target, Mode: "closed_loop", Rate: cfg.rate,
		Concurrency: cfg.concurrency, Connections: cfg.connections,
		WarmupS: cfg.warmup.Seconds(), DurationS: round3(win.to.Sub(win.from).Seconds()),
		OK: total.ok, Errors: total.errors,
	}
	res.Requests = total.ok
	for _, n := range total.errors {
		res.Requests += n
	}
	if cfg.rate > 0 {
		res.Mode = "fixed_rate"
		sent := atomic.LoadInt64(&startedTotal)
		if unsent := scheduledBefore(start, cfg.rate, win.to) - sent; unsent > 0 {
			res.Unsent = unsent
		}
	}
	if res.DurationS > 0 {
		res.RPS = round3(float64(res.Requests) / win.to.Sub(win.from).Seconds())
	}
	h := total.latency
	res.LatencyMs = latencyMs{
		P50: round3(h.quantileMs(0.50)), P90: round3(h.quantileMs(0.90)),
		P99: round3(h.quantileMs(0.99)), Max: round3(h.max.Seconds() * 1000),
		Mean: round3(h.meanMs()),
	}
	return res, nil
}

func main() {
	cfg, rc := parseFlags()
	if rc != 0 {
		flag.Usage()
		os.Exit(rc)
	}
	res, err := run(&cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(res); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}

// codeName gives the canonical upper-case name of a gRPC status code, as in the gRPC spec.
func codeName(c codes.Code) string {
	if name, ok := codeNames[c]; ok {
		return name
	}
	return fmt.Sprintf("CODE_%d", uint32(c))
}

var codeNames = map[codes.Code]string{
	codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN",
	codes.InvalidArgument: "INVALID_ARGUMENT", codes.DeadlineExceeded: "DEADLINE_EXCEEDED",
	codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED",
	codes.OutOfRange: "OUT_OF_RANGE", codes.Unimplemented: "UNIMPLEMENTED",
	codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE", codes.DataLoss: "DATA_LOSS",
	codes.Unauthenticated: "UNAUTHENTICATED",
}
