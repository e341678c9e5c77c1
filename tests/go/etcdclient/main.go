// etcdclient: a grpc-go client that finds its backends through etcd's own gRPC
// resolver, as an application using tether's etcd entries would, and calls
// them round robin. Built for grpc-go 1.33 and etcd 3.4 (Debian's
// golang-google-grpc-dev and golang-etcd-server-dev, GOPATH mode); with etcd
// 3.5+ the imports are go.etcd.io/etcd/client/v3 and
// go.etcd.io/etcd/client/v3/naming/resolver.
//
//	etcdclient -endpoints http://127.0.0.1:2379 -target services/orders [-every 2ms] [-window 100ms]
//
// Prints one JSON line per observation on stdout:
//
//	{"event":"resolved","t_ns":…,"addrs":[{"addr":"127.0.0.1:50051","metadata":{"id":"orders-1",…}}]}
//	    on every resolver update, with tether's metadata decoded;
//	{"event":"window","t_ns":…,"served":{"127.0.0.1:50051":17,…},"first_ns":{…},"last_ns":{…},"errors":0,"last_error":""}
//	    every window: how many Health/Check calls each backend answered (from
//	    grpc.Peer), and when the first and the last of them were sent. The
//	    backends in `served` are the client's rotation.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/clientv3"
	etcdresolver "go.etcd.io/etcd/clientv3/naming/resolver"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/resolver"
)

var out = struct {
	sync.Mutex
	enc *json.Encoder
}{enc: json.NewEncoder(os.Stdout)}

func emit(v map[string]interface{}) {
	v["t_ns"] = time.Now().UnixNano()
	out.Lock()
	defer out.Unlock()
	if err := out.enc.Encode(v); err != nil {
		os.Exit(1) // stdout closed: the test is gone
	}
}

// tetherMetadata decodes what tether puts in resolver.Address.Metadata: one
// JSON string (grpc-go hashes addresses, so it must not be a map).
func tetherMetadata(a resolver.Address) (map[string]interface{}, error) {
	s, ok := a.Metadata.(string)
	if !ok {
		return nil, fmt.Errorf("metadata is %T, not a string", a.Metadata)
	}
	var md map[string]interface{}
	err := json.Unmarshal([]byte(s), &md)
	return md, err
}

// watching wraps a resolver builder to print every address list it hands to gRPC.
type watching struct{ resolver.Builder }

func (w watching) Build(t resolver.Target, cc resolver.ClientConn, o resolver.BuildOptions) (resolver.Resolver, error) {
	return w.Builder.Build(t, printingConn{cc}, o)
}

type printingConn struct{ resolver.ClientConn }

func (p printingConn) UpdateState(s resolver.State) {
	addrs := []map[string]interface{}{}
	for _, a := range s.Addresses {
		md, err := tetherMetadata(a)
		entry := map[string]interface{}{"addr": a.Addr, "metadata": md}
		if err != nil {
			entry["error"] = err.Error()
		}
		addrs = append(addrs, entry)
	}
	emit(map[string]interface{}{"event": "resolved", "addrs": addrs})
	p.ClientConn.UpdateState(s)
}

func main() {
	endpoints := flag.String("endpoints", "http://127.0.0.1:2379", "etcd endpoints, comma-separated")
	target := flag.String("target", "services/orders", "key prefix to resolve (etcd:///<target>)")
	every := flag.Duration("every", 2*time.Millisecond, "pause between calls")
	window := flag.Duration("window", 100*time.Millisecond, "report period")
	authority := flag.String("authority", "", "the :authority to send (default: the target's name)")
	flag.Parse()

	cli, err := clientv3.New(clientv3.Config{Endpoints: strings.Split(*endpoints, ","), DialTimeout: 5 * time.Second})
	if err != nil {
		fmt.Fprintln(os.Stderr, "etcd:", err)
		os.Exit(2)
	}
	defer cli.Close()
	builder, err := etcdresolver.NewBuilder(cli)
	if err != nil {
		fmt.Fprintln(os.Stderr, "resolver:", err)
		os.Exit(2)
	}
	// grpc-go's default :authority is the target's endpoint, here
	// "services/orders/", which HTTP/2 servers that check it (hyper, so
	// tonic) reset with PROTOCOL_ERROR: send a plain host name instead.
	if *authority == "" {
		*authority = strings.Trim(strings.ReplaceAll(*target, "/", "."), ".")
	}
	conn, err := grpc.Dial("etcd:///"+*target,
		grpc.WithResolvers(watching{builder}),
		grpc.WithAuthority(*authority),
		grpc.WithInsecure(),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`))
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(2)
	}
	defer conn.Close()
	health := healthpb.NewHealthClient(conn)

	served := map[string]int{}
	first, last := map[string]int64{}, map[string]int64{}
	errors, lastError := 0, ""
	next := time.Now().Add(*window)
	for {
		var p peer.Peer
		sent := time.Now().UnixNano()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		// Answered whatever the backend's health: SERVING or NOT_SERVING, the
		// call still shows which backend the client picked.
		_, err := health.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Peer(&p))
		cancel()
		if err == nil && p.Addr != nil {
			a := p.Addr.String()
			served[a]++
			if _, ok := first[a]; !ok {
				first[a] = sent
			}
			last[a] = sent
		} else {
			errors++
			lastError = fmt.Sprint(err)
		}
		if time.Now().After(next) {
			emit(map[string]interface{}{"event": "window", "served": served, "first_ns": first, "last_ns": last, "errors": errors, "last_error": lastError})
			served, first, last, errors, lastError = map[string]int{}, map[string]int64{}, map[string]int64{}, 0, ""
			next = time.Now().Add(*window)
		}
		time.Sleep(*every)
	}
}
