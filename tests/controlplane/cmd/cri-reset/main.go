// Command cri-reset stops and removes every pod sandbox (and so every container
// and its CNI network attachment) of one CRI runtime. The test node runs it
// before stopping its containerd: containerd's shims outlive containerd, so
// without a CRI teardown the pods' processes, veths and netns mounts would stay
// behind. It is a tiny stand-in for `crictl rmp -fa`, which Debian does not
// package.
//
//	cri-reset unix:///path/to/containerd.sock
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: cri-reset unix:///path/to/cri.sock")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := grpc.NewClient(os.Args[1], grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(os.Stderr, "cri-reset:", err)
		os.Exit(1)
	}
	defer conn.Close()
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	resp, err := rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "cri-reset: list sandboxes:", err)
		os.Exit(1)
	}
	failed := false
	for _, sb := range resp.Items {
		// StopPodSandbox kills the sandbox's containers and tears down its network;
		// RemovePodSandbox then deletes them.
		if _, err := rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: sb.Id}); err != nil {
			fmt.Fprintf(os.Stderr, "cri-reset: stop %s: %v\n", sb.Id, err)
			failed = true
		}
		if _, err := rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: sb.Id}); err != nil {
			fmt.Fprintf(os.Stderr, "cri-reset: remove %s: %v\n", sb.Id, err)
			failed = true
		}
	}
	fmt.Printf("removed %d pod sandboxes\n", len(resp.Items))
	if failed {
		os.Exit(1)
	}
}
