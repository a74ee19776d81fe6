// Command lookup resolves names with Go's own resolver, as kubeadm does,
// and prints each result and how long it took: the end-to-end test runs it
// inside a node to show that DNS there answers or fails at once.
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"time"
)

func main() {
	r := &net.Resolver{PreferGo: true}
	for _, h := range os.Args[1:] {
		start := time.Now()
		addrs, err := r.LookupHost(context.Background(), h)
		fmt.Printf("%s\t%v\t%v\t%v\n", h, addrs, err, time.Since(start))
	}
}
