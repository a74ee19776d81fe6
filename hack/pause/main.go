// Command pause is the e2e test's pod sandbox image: it sleeps until
// SIGTERM or SIGINT, like registry.k8s.io/pause, and reaps orphans as PID 1.
// Like it, `pause -v` prints a version and exits 0: kubeadm upgrade's
// health-check Job runs exactly that and waits for it to complete.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		fmt.Println("pause (airadm e2e stand-in)")
		return
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sig {
		if s == syscall.SIGCHLD {
			for {
				pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
