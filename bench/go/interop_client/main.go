// Command interop_client runs grpc's interop cases (SPECS.md §1) with grpc-go against a
// TestService server, so the conformance suite can check our server and sidecars against a
// client we did not write. Exit status 0 means every requested case passed.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc"
	_ "google.golang.org/grpc/encoding/gzip" // registers "gzip" for compressed cases
)

type testCase func(ctx context.Context, conn *grpc.ClientConn) error

var cases = map[string]testCase{
	"empty_unary":                 emptyUnary,
	"large_unary":                 largeUnary,
	"client_compressed_unary":     clientCompressedUnary,
	"server_compressed_unary":     serverCompressedUnary,
	"client_streaming":            clientStreaming,
	"server_streaming":            serverStreaming,
	"ping_pong":                   pingPong,
	"empty_stream":                emptyStream,
	"custom_metadata":             customMetadata,
	"status_code_and_message":     statusCodeAndMessage,
	"special_status_message":      specialStatusMessage,
	"unimplemented_method":        unimplementedMethod,
	"unimplemented_service":       unimplementedService,
	"cancel_after_begin":          cancelAfterBegin,
	"cancel_after_first_response": cancelAfterFirstResponse,
	"timeout_on_sleeping_server":  timeoutOnSleepingServer,
}

func caseNames() []string {
	names := make([]string, 0, len(cases))
	for name := range cases {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

func main() {
	server := flag.String("server", "", "HOST:PORT of the TestService server (required)")
	testCase := flag.String("test_case", "",
		"case to run, a comma-separated list, or 'all'; one of: "+strings.Join(caseNames(), ", "))
	timeout := flag.Duration("timeout", 20*time.Second, "upper bound on each case")
	flag.Parse()
	if *server == "" || *testCase == "" {
		fmt.Fprintln(os.Stderr, "interop_client: --server and --test_case are required")
		flag.Usage()
		os.Exit(2)
	}
	names := strings.Split(*testCase, ",")
	if *testCase == "all" {
		names = caseNames()
	}
	for _, name := range names {
		if _, ok := cases[name]; !ok {
			fmt.Fprintf(os.Stderr, "interop_client: unknown test case %q (known: %s)\n",
				name, strings.Join(caseNames(), ", "))
			os.Exit(2)
		}
	}

	conn, err := grpc.Dial(*server, grpc.WithInsecure(), grpc.WithStatsHandler(compressionStats{}))
	if err != nil {
		fmt.Fprintf(os.Stderr, "interop_client: dial %s: %v\n", *server, err)
		os.Exit(1)
	}
	defer conn.Close()

	failed := 0
	for _, name := range names {
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		err := cases[name](ctx, conn)
		cancel()
		elapsed := time.Since(start).Round(time.Millisecond)
		if err != nil {
			failed++
			fmt.Printf("FAIL %s (%v): %v\n", name, elapsed, err)
		} else {
			fmt.Printf("PASS %s (%v)\n", name, elapsed)
		}
	}
	if failed > 0 {
		fmt.Fprintf(os.Stderr, "interop_client: %d of %d case(s) failed against %s\n",
			failed, len(names), *server)
		os.Exit(1)
	}
}
