// Command pause is the test node's pod sandbox process (what registry.k8s.io/pause
// is on a real node): PID 1 of each pod, it holds the pod's namespaces open,
// reaps orphaned children, and exits on SIGTERM or SIGINT. It is built here
// because the test node has no registry to pull the upstream image from.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		// As PID 1 of a pod that shares its PID namespace, reap every exited child.
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
