// kstatus reads Kubernetes objects as JSON, one per line on stdin, and prints for each the
// status that sigs.k8s.io/cli-utils' kstatus computes (what Flux and other GitOps tools wait
// on), as JSON: {"status": "InProgress|Current|Failed|...", "message": "..."}.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type answer struct {
	Status  string `json:"status"`
	Message string `json:"message"`
	Error   string `json:"error,omitempty"`
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 16<<20)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		// As the API machinery reads an object (integers stay integers), not as encoding/json.
		object := &unstructured.Unstructured{}
		if err := object.UnmarshalJSON(in.Bytes()); err != nil {
			fmt.Fprintln(os.Stderr, "kstatus: not a Kubernetes object:", err)
			os.Exit(2)
		}
		result, err := status.Compute(object)
		reply := answer{}
		if err != nil {
			reply.Error = err.Error()
		} else {
			reply.Status, reply.Message = string(result.Status), result.Message
		}
		if err := out.Encode(reply); err != nil {
			os.Exit(1)
		}
	}
	if err := in.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
}
