// Command fake-gpu-plugin is the test node's stand-in for NVIDIA's k8s-device-plugin: it
// registers with the kubelet over the real device-plugin gRPC API (v1beta1) and advertises
// fake GPUs as one extended resource (nvidia.com/gpu, nvidia.com/gpu.shared or
// nvidia.com/mig-<profile>). Allocate answers as NVIDIA's plugin does: NVIDIA_VISIBLE_DEVICES
// with the allocated IDs, and in MPS mode CUDA_MPS_PIPE_DIRECTORY plus mounts of the daemon's
// pipe directory and of its /dev/shm. The kubelet merges that with the pod's own env and
// mounts, as on a GPU node. There is no GPU and no MPS daemon behind it.
//
//	fake-gpu-plugin -plugin-dir <kubelet root>/device-plugins -resource nvidia.com/gpu \
//	  -devices 4 [-mps-root DIR]
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// Where a client container finds the MPS daemon, as NVIDIA's plugin mounts it.
const mpsContainerRoot = "/mps"

type plugin struct {
	pluginapi.UnimplementedDevicePluginServer
	resource string
	devices  []*pluginapi.Device
	mpsRoot  string // host directory holding the daemon's pipe and shm; "" outside MPS
}

func (p *plugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

func (p *plugin) ListAndWatch(_ *pluginapi.Empty, stream pluginapi.DevicePlugin_ListAndWatchServer) error {
	if err := stream.Send(&pluginapi.ListAndWatchResponse{Devices: p.devices}); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

func (p *plugin) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp := &pluginapi.AllocateResponse{}
	for _, c := range req.ContainerRequests {
		out := &pluginapi.ContainerAllocateResponse{
			Envs: map[string]string{"NVIDIA_VISIBLE_DEVICES": strings.Join(c.DevicesIds, ",")},
		}
		if p.mpsRoot != "" {
			pipe := filepath.Join(mpsContainerRoot, p.resource, "pipe")
			out.Envs["CUDA_MPS_PIPE_DIRECTORY"] = pipe
			out.Mounts = []*pluginapi.Mount{
				{ContainerPath: pipe, HostPath: filepath.Join(p.mpsRoot, p.resource, "pipe")},
				{ContainerPath: "/dev/shm", HostPath: filepath.Join(p.mpsRoot, "shm")},
			}
		}
		resp.ContainerResponses = append(resp.ContainerResponses, out)
	}
	return resp, nil
}

func (p *plugin) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}

func register(pluginDir, endpoint, resource string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+filepath.Join(pluginDir, "kubelet.sock"),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
		Version:      pluginapi.Version,
		Endpoint:     endpoint,
		ResourceName: resource,
		Options:      &pluginapi.DevicePluginOptions{},
	})
	return err
}

// socketID tells one kubelet.sock from the next: its inode and change time. The inode alone
// does not, since a filesystem may hand a new file the inode the deleted one had (ext4 does,
// at once), and a restarted kubelet would then never be registered with again.
type socketID struct {
	ino   uint64
	ctime int64
}

func identify(path string) socketID {
	info, err := os.Stat(path)
	if err != nil {
		return socketID{}
	}
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		return socketID{st.Ino, st.Ctim.Nano()}
	}
	return socketID{}
}

func main() {
	pluginDir := flag.String("plugin-dir", "/var/lib/kubelet/device-plugins", "the kubelet's device-plugin directory")
	resource := flag.String("resource", "nvidia.com/gpu", "the extended resource to advertise")
	count := flag.Int("devices", 1, "how many devices to advertise")
	mpsRoot := flag.String("mps-root", "", "MPS mode: host directory of the daemon's pipe and shm")
	flag.Parse()

	p := &plugin{resource: *resource, mpsRoot: *mpsRoot}
	for i := 0; i < *count; i++ {
		p.devices = append(p.devices, &pluginapi.Device{ID: fmt.Sprintf("fake-gpu-%d", i), Health: pluginapi.Healthy})
	}
	if *mpsRoot != "" {
		for _, dir := range []string{filepath.Join(*mpsRoot, *resource, "pipe"), filepath.Join(*mpsRoot, "shm")} {
			if err := os.MkdirAll(dir, 0o777); err != nil {
				fmt.Fprintln(os.Stderr, "fake-gpu-plugin:", err)
				os.Exit(1)
			}
		}
	}
	endpoint := "cotrain-" + strings.NewReplacer("/", "-", ".", "-").Replace(*resource) + ".sock"
	socket := filepath.Join(*pluginDir, endpoint)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	// Serve and register, and again whenever the kubelet restarts: it makes a new kubelet.sock,
	// empties the plugin directory (our socket too) and forgets its plugins, as on a real node.
	var server *grpc.Server
	var registered socketID
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			if server != nil {
				server.Stop()
			}
			return
		case <-tick.C:
			current := identify(filepath.Join(*pluginDir, "kubelet.sock"))
			if current == (socketID{}) || current == registered {
				continue
			}
			if server != nil {
				server.Stop()
			}
			_ = os.Remove(socket)
			listener, err := net.Listen("unix", socket)
			if err != nil {
				fmt.Fprintln(os.Stderr, "fake-gpu-plugin:", err)
				os.Exit(1)
			}
			server = grpc.NewServer()
			pluginapi.RegisterDevicePluginServer(server, p)
			go func(s *grpc.Server) { _ = s.Serve(listener) }(server)
			if err := register(*pluginDir, endpoint, *resource); err != nil {
				fmt.Fprintln(os.Stderr, "fake-gpu-plugin: register:", err)
				continue
			}
			registered = current
			fmt.Printf("registered %s with %d devices\n", *resource, *count)
		}
	}
}
