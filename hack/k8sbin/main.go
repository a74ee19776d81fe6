// Command k8sbin builds the pinned Kubernetes and etcd binaries the tests
// run, into the cache that internal/k8sbin describes, and prints its path.
// It needs only Go and the module proxy. Run it from the repository root:
//
//	go run ./hack/k8sbin
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"

	"airadm.dev/airadm/internal/k8sbin"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	repo, err := os.Getwd()
	if err == nil {
		_, err = os.Stat("hack/k8sbin/k8s/go.mod")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "k8sbin: run this from the repository root:", err)
		os.Exit(2)
	}
	dir, err := k8sbin.Ensure(ctx, repo, os.Stderr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "k8sbin:", err)
		os.Exit(1)
	}
	fmt.Println(dir)
}
