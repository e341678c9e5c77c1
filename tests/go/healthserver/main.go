// healthserver: a grpc-go server with grpc-go's own health service
// (google.golang.org/grpc/health) and default settings, including the default
// keepalive enforcement (pings more often than every 5 minutes without a
// stream earn a GOAWAY "too_many_pings"). Driven from stdin like
// examples/health_server.rs:
//
//	healthserver 127.0.0.1:0 [SERVICE ...]
//
// Prints "listening on ADDR" once bound. Stdin lines: `serving`, `not_serving`
// (every named service and "" at once; answers "ok"), `stop` (health.Shutdown(),
// then GracefulStop(); prints "stopped in N ms" when GracefulStop returns, then
// exits). grpc-go's transport log (verbosity 2, so "Got too many pings" would
// show) goes to stderr.
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/grpclog"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func main() {
	grpclog.SetLoggerV2(grpclog.NewLoggerV2WithVerbosity(os.Stderr, os.Stderr, os.Stderr, 2))
	addr := "127.0.0.1:0"
	if len(os.Args) > 1 {
		addr = os.Args[1]
	}
	services := append([]string{""}, os.Args[min(2, len(os.Args)):]...)
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	srv := grpc.NewServer()
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	set := func(st healthpb.HealthCheckResponse_ServingStatus) {
		for _, s := range services {
			hs.SetServingStatus(s, st)
		}
	}
	set(healthpb.HealthCheckResponse_SERVING)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	fmt.Printf("listening on %s\n", lis.Addr())

	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		switch strings.TrimSpace(in.Text()) {
		case "serving":
			set(healthpb.HealthCheckResponse_SERVING)
		case "not_serving":
			set(healthpb.HealthCheckResponse_NOT_SERVING)
		case "stop":
			start := time.Now()
			hs.Shutdown()
			srv.GracefulStop()
			fmt.Printf("stopped in %d ms\n", time.Since(start).Milliseconds())
			<-served
			return
		case "":
			continue
		default:
			fmt.Fprintf(os.Stderr, "unknown command %q: use serving, not_serving or stop\n", in.Text())
			continue
		}
		fmt.Println("ok")
	}
	// stdin closed: the test is gone.
	srv.Stop()
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}
