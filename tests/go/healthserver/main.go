// healthserver: a grpc-go server with grpc-go's own health service
// (google.golang.org/grpc/health) and default settings, including the default
// keepalive enforcement (pings more often than every 5 minutes without a
// stream earn a GOAWAY "too_many_pings"). Driven from stdin like
// examples/health_server.rs:
//
//	healthserver 127.0.0.1:0 [SERVICE ...]
//	healthserver unix:///path/to.sock [SERVICE ...]
//
// Prints "listening on ADDR" once bound. Stdin lines: `serving`, `not_serving`
// (every named service and "" at once; answers "ok"), `stop` (health.Shutdown(),
// then GracefulStop(); prints "stopped in N ms" when GracefulStop returns, then
// exits). grpc-go's transport log (verbosity 2, so "Got too many pings" would
// show) goes to stderr.
//
// With AUTH_TOKEN set, the server has a unary auth interceptor, as services
// built on kratos or go-zero do: every unary call (the health Check
// included) without `authorization: Bearer <token>` gets Unauthenticated
// ("missing token" or "invalid token"); streams pass. The stdin line
// `token NEW` changes the token it accepts (a rotation; answers "ok").
// Every authorization value it sees is appended to $AUTH_LOG if set.
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"context"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/grpclog"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

var (
	tokenMu sync.Mutex
	token   = os.Getenv("AUTH_TOKEN")
)

func auth(ctx context.Context, req interface{}, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (interface{}, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	got := md.Get("authorization")
	if path := os.Getenv("AUTH_LOG"); path != "" {
		if f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600); err == nil {
			fmt.Fprintf(f, "%s %q\n", info.FullMethod, got)
			f.Close()
		}
	}
	if len(got) == 0 {
		return nil, status.Error(codes.Unauthenticated, "missing token")
	}
	tokenMu.Lock()
	want := "Bearer " + token
	tokenMu.Unlock()
	if got[0] != want {
		return nil, status.Error(codes.Unauthenticated, "invalid token")
	}
	return handler(ctx, req)
}

func main() {
	grpclog.SetLoggerV2(grpclog.NewLoggerV2WithVerbosity(os.Stderr, os.Stderr, os.Stderr, 2))
	addr := "127.0.0.1:0"
	if len(os.Args) > 1 {
		addr = os.Args[1]
	}
	services := append([]string{""}, os.Args[min(2, len(os.Args)):]...)
	network := "tcp"
	if strings.HasPrefix(addr, "unix://") {
		network, addr = "unix", strings.TrimPrefix(addr, "unix://")
	}
	lis, err := net.Listen(network, addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var opts []grpc.ServerOption
	if token != "" {
		opts = append(opts, grpc.ChainUnaryInterceptor(auth))
	}
	srv := grpc.NewServer(opts...)
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
	if network == "unix" {
		// The driver reads a port after the last ':'; a socket has none.
		fmt.Printf("listening on unix://%s:0\n", addr)
	} else {
		fmt.Printf("listening on %s\n", lis.Addr())
	}

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
			if t := strings.TrimPrefix(strings.TrimSpace(in.Text()), "token "); t != strings.TrimSpace(in.Text()) {
				tokenMu.Lock()
				token = t
				tokenMu.Unlock()
				break
			}
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
