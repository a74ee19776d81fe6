// Command vmimage builds the Debian guest image the VM end-to-end test
// boots (see internal/vmimage) into the cache, unless it is there, and
// prints its directory. The test builds it itself when it is missing; run
// this to build it ahead of time (as root; about 80 s with a fast mirror):
//
//	go run ./hack/vmimage
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"

	"airadm.dev/airadm/internal/vmimage"
)

func main() {
	c := vmimage.Default()
	flag.StringVar(&c.Mirror, "mirror", c.Mirror, "Debian archive to fetch the packages from")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	img, err := vmimage.Ensure(ctx, c, os.Stderr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmimage:", err)
		os.Exit(1)
	}
	fmt.Println(img.Dir)
}
