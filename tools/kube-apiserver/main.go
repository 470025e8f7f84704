// Command kube-apiserver is the upstream kube-apiserver with an embedded etcd, for sidero's
// integration tests: one static binary, one process, nothing downloaded but Go modules.
//
// The same binary also runs the upstream kube-controller-manager when its first argument is
// "kube-controller-manager" (or "controller-manager"); every later argument goes to its own
// flag parser unchanged. The tests run it as a second process with only the garbage collector
// and the namespace controller, so ownerReferences and namespace deletion behave as in a cluster.
// One binary means one build and one cache entry.
//
// Flags that start with --embedded-etcd- are ours and are removed before the rest reach
// kube-apiserver's own flag parser:
//
//	--embedded-etcd-data-dir=DIR  start an etcd member with its data in DIR (no fsync; test data only)
//
// When an etcd is embedded and no --etcd-servers flag is given, the wrapper adds one that points at
// the embedded member. etcd listens on free loopback ports chosen by the kernel, so parallel test
// runs never collide. etcd is closed after kube-apiserver returns (on SIGTERM/SIGINT).
package main

import (
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"go.etcd.io/etcd/server/v3/embed"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // for JSON log format registration
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // load all the prometheus client-go plugins
	_ "k8s.io/component-base/metrics/prometheus/version"  // for version metric registration
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
	kcm "k8s.io/kubernetes/cmd/kube-controller-manager/app"

	_ "time/tzdata" // for CronJob time zones, as upstream
)

const ourPrefix = "--embedded-etcd-"

// options are the wrapper's own flags.
type options struct {
	etcdDataDir string
}

// splitArgs separates the wrapper's flags from kube-apiserver's. It is deliberately tiny (only
// --name=value forms) so that kube-apiserver's parser sees exactly what it would upstream.
func splitArgs(args []string) (options, []string, error) {
	var opts options
	rest := make([]string, 0, len(args))
	for _, a := range args {
		if !strings.HasPrefix(a, ourPrefix) {
			rest = append(rest, a)
			continue
		}
		name, value, ok := strings.Cut(strings.TrimPrefix(a, ourPrefix), "=")
		if !ok || value == "" {
			return opts, nil, fmt.Errorf("%s%s needs a value (use --name=value)", ourPrefix, name)
		}
		switch name {
		case "data-dir":
			opts.etcdDataDir = value
		default:
			return opts, nil, fmt.Errorf("unknown flag %s%s", ourPrefix, name)
		}
	}
	return opts, rest, nil
}

func hasFlag(args []string, name string) bool {
	for _, a := range args {
		if a == name || strings.HasPrefix(a, name+"=") {
			return true
		}
	}
	return false
}

// startEtcd runs a single-member etcd on kernel-chosen loopback ports and returns it once it
// serves clients.
func startEtcd(dataDir string) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name = "sidero-test"
	cfg.Dir = dataDir
	cfg.UnsafeNoFsync = true
	cfg.Logger = "zap"
	cfg.LogLevel = "error"
	cfg.LogOutputs = []string{"stderr"}
	// Port 0: the kernel picks a free port. The peer URL is never dialled in a one-member
	// cluster, so advertising ":0" for it is harmless.
	loop := url.URL{Scheme: "http", Host: "127.0.0.1:0"}
	cfg.ListenClientUrls = []url.URL{loop}
	cfg.AdvertiseClientUrls = []url.URL{loop}
	cfg.ListenPeerUrls = []url.URL{loop}
	cfg.AdvertisePeerUrls = []url.URL{loop}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.ListenMetricsUrls = nil
	// The REST gateway would dial the advertised client URL, which says port 0; kube-apiserver
	// speaks gRPC only, so it is not needed.
	cfg.EnableGRPCGateway = false

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("etcd failed while starting: %w", err)
	case <-time.After(60 * time.Second):
		e.Server.Stop()
		e.Close()
		return nil, fmt.Errorf("etcd not ready after 60s")
	}
}

// controllerManagerCommands are the first arguments that select kube-controller-manager.
var controllerManagerCommands = map[string]bool{
	"kube-controller-manager": true,
	"controller-manager":      true,
}

func main() {
	if len(os.Args) > 1 && controllerManagerCommands[os.Args[1]] {
		// As upstream cmd/kube-controller-manager: it installs its own signal handling.
		cmd := kcm.NewControllerManagerCommand()
		cmd.SetArgs(os.Args[2:])
		os.Exit(cli.Run(cmd))
	}

	opts, rest, err := splitArgs(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "kube-apiserver wrapper:", err)
		os.Exit(2)
	}

	var etcd *embed.Etcd
	if opts.etcdDataDir != "" {
		etcd, err = startEtcd(opts.etcdDataDir)
		if err != nil {
			fmt.Fprintln(os.Stderr, "kube-apiserver wrapper: embedded etcd:", err)
			os.Exit(1)
		}
		if !hasFlag(rest, "--etcd-servers") {
			addr := etcd.Clients[0].Addr().String()
			rest = append(rest, "--etcd-servers=http://"+addr)
		}
	}

	// NewAPIServerCommand installs the signal handler itself (SetupSignalContext panics when
	// called twice), so the wrapper installs none and simply closes etcd once Run returns.
	cmd := app.NewAPIServerCommand()
	cmd.SetArgs(rest)
	code := cli.Run(cmd)

	if etcd != nil {
		etcd.Close()
	}
	os.Exit(code)
}
