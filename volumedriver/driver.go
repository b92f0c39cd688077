package volumedriver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/tether-io/tether/internal/unixsock"
)

// Volume is what the Backend tells Docker about one volume.
type Volume struct {
	Name string
	// Mountpoint is the host path of the volume's data on this host, or ""
	// when this host cannot mount it.
	Mountpoint string
	CreatedAt  time.Time
	// Status shows up in `docker volume inspect`.
	Status map[string]any
}

// Backend is what the driver needs from the volumes' owner. Get and List
// must answer from local state without blocking on the network or on the
// Docker API.
type Backend interface {
	// WaitReady blocks until the local catalog is current enough to say
	// that a volume does not exist, or ctx ends.
	WaitReady(ctx context.Context) error
	// Create makes a new volume with validated options.
	Create(ctx context.Context, name string, opts CreateOptions) error
	// Remove deletes a volume (tether keeps it for a retention period).
	Remove(ctx context.Context, name string) error
	// Get returns a volume Docker may see; ok is false for an unknown or
	// deleted one.
	Get(name string) (v Volume, ok bool)
	// List returns every volume Docker may see.
	List() []Volume
	// Mount checks that this host may mount the volume now and returns the
	// host path to give Docker.
	Mount(ctx context.Context, name string) (mountpoint string, err error)
}

// DefaultReadyTimeout bounds how long Get and List wait for the Backend's
// catalog; it stays below dockerd's 60 s timeout for those calls.
const DefaultReadyTimeout = 50 * time.Second

// maxBody bounds a request body; Docker's are a few hundred bytes.
const maxBody = 1 << 20

// Config configures a Driver.
type Config struct {
	Backend Backend
	// StatePath is the file that keeps the mount table across restarts.
	StatePath string
	Logger    *slog.Logger
	// ReadyTimeout overrides DefaultReadyTimeout (tests).
	ReadyTimeout time.Duration
	// InUse, if set, tells whether any container of this host uses a
	// volume through this driver (asked of the Docker Engine); a Remove of
	// a volume with mounts asks it and forgets the mounts if none does.
	// Never called from Get, List or Mount: dockerd calls those while it
	// starts, before it serves its API.
	InUse func(ctx context.Context, volume string) (bool, error)
}

// Driver serves the volume plugin protocol for a Backend.
type Driver struct {
	backend      Backend
	mounts       *mountTable
	log          *slog.Logger
	readyTimeout time.Duration
	inUse        func(ctx context.Context, volume string) (bool, error)

	// locks holds one mutex per volume, taken across a Mount's backend
	// call and its count, and by Exclusive.
	locksMu sync.Mutex
	locks   map[string]*sync.Mutex

	mu       sync.Mutex
	srv      *http.Server
	sockPath string
	wg       sync.WaitGroup
}

// New loads the mount table and builds a driver; it opens no socket.
func New(cfg Config) (*Driver, error) {
	if cfg.Backend == nil {
		return nil, errors.New("volumedriver: a backend is required")
	}
	if cfg.StatePath == "" {
		return nil, errors.New("volumedriver: a state file path is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.ReadyTimeout <= 0 {
		cfg.ReadyTimeout = DefaultReadyTimeout
	}
	mt, err := loadMountTable(cfg.StatePath)
	if err != nil {
		return nil, err
	}
	return &Driver{backend: cfg.Backend, mounts: mt, log: cfg.Logger, readyTimeout: cfg.ReadyTimeout, inUse: cfg.InUse, locks: map[string]*sync.Mutex{}}, nil
}

// MountCount is how many Docker mounts of volume are active on this host.
func (d *Driver) MountCount(volume string) int { return d.mounts.count(volume) }

// lock returns volume's mutex.
func (d *Driver) lock(volume string) *sync.Mutex {
	d.locksMu.Lock()
	defer d.locksMu.Unlock()
	m, ok := d.locks[volume]
	if !ok {
		m = &sync.Mutex{}
		d.locks[volume] = m
	}
	return m
}

// Exclusive runs fn with the number of active mounts of volume on this
// host, while no Mount of it can proceed: a volume's owner uses it to hand
// the volume to another host only if nothing here has it mounted.
func (d *Driver) Exclusive(volume string, fn func(mounts int) error) error {
	m := d.lock(volume)
	m.Lock()
	defer m.Unlock()
	return fn(d.mounts.count(volume))
}

// ForgetStaleMounts drops the mounts this host counts for volume if
// inUse, asked while no Mount of the volume can proceed, says that no
// container uses it: Docker sends no Unmount for a container that stopped
// while this driver was down (a crash, a restart), and those mounts would
// otherwise block `docker volume rm` and moves for ever. It returns how
// many were dropped.
func (d *Driver) ForgetStaleMounts(ctx context.Context, volume string, inUse func(ctx context.Context, volume string) (bool, error)) (int, error) {
	m := d.lock(volume)
	m.Lock()
	defer m.Unlock()
	n := d.mounts.count(volume)
	if n == 0 {
		return 0, nil
	}
	used, err := inUse(ctx, volume)
	if err != nil || used {
		return 0, err
	}
	dropped, err := d.mounts.forget(volume)
	if err != nil {
		return 0, fmt.Errorf("forgetting the stale mounts of volume %s: %w", volume, err)
	}
	d.log.Warn("forgot stale mounts: no container uses the volume (Docker stopped them while the driver was down, so no Unmount came)", "volume", volume, "mounts", dropped)
	return dropped, nil
}

// MountedVolumes lists the volumes mounted on this host, sorted.
func (d *Driver) MountedVolumes() []string { return d.mounts.volumes() }

// Start listens on the unix socket path (replacing a stale socket, refusing
// when another process answers on it) and serves until Close.
func (d *Driver) Start(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("creating the plugin socket directory: %w", err)
	}
	ln, err := unixsock.Listen(path, 0o660, "plugin socket", "stop it or pick another --driver-socket")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: d.Handler(), ReadHeaderTimeout: 10 * time.Second}
	d.mu.Lock()
	d.srv, d.sockPath = srv, path
	d.mu.Unlock()
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("volume plugin server stopped", "err", err)
		}
	}()
	d.log.Info("docker volume driver listening", "socket", path)
	return nil
}

// Close stops serving and removes the socket.
func (d *Driver) Close() {
	d.mu.Lock()
	srv, path := d.srv, d.sockPath
	d.srv = nil
	d.mu.Unlock()
	if srv == nil {
		return
	}
	srv.Close()
	d.wg.Wait()
	os.Remove(path)
}

// Handler is the protocol's HTTP handler (exported for tests and for
// serving on another listener, e.g. from socket activation).
func (d *Driver) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /Plugin.Activate", func(w http.ResponseWriter, _ *http.Request) {
		reply(w, http.StatusOK, implementsResponse{Implements: []string{"VolumeDriver"}})
	})
	mux.HandleFunc("POST /VolumeDriver.Capabilities", func(w http.ResponseWriter, _ *http.Request) {
		reply(w, http.StatusOK, capabilitiesResponse{Capabilities: capabilities{Scope: "global"}})
	})
	mux.HandleFunc("POST /VolumeDriver.Create", d.create)
	mux.HandleFunc("POST /VolumeDriver.Remove", d.remove)
	mux.HandleFunc("POST /VolumeDriver.Mount", d.mount)
	mux.HandleFunc("POST /VolumeDriver.Unmount", d.unmount)
	mux.HandleFunc("POST /VolumeDriver.Path", d.path)
	mux.HandleFunc("POST /VolumeDriver.Get", d.get)
	mux.HandleFunc("POST /VolumeDriver.List", d.list)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fail(w, http.StatusNotFound, fmt.Errorf("%s %s is not part of the volume plugin protocol", r.Method, r.URL.Path))
	})
	return mux
}

// decode reads a JSON body into v; an empty body leaves v zero (Docker
// sends none for Activate and {} for List).
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	b, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		fail(w, http.StatusBadRequest, fmt.Errorf("reading the request: %w", err))
		return false
	}
	if len(b) > maxBody {
		fail(w, http.StatusRequestEntityTooLarge, fmt.Errorf("request body larger than %d bytes", maxBody))
		return false
	}
	if len(b) == 0 {
		return true
	}
	if err := json.Unmarshal(b, v); err != nil {
		fail(w, http.StatusBadRequest, fmt.Errorf("invalid request body: %w", err))
		return false
	}
	return true
}

func reply(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/vnd.docker.plugins.v1.2+json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// fail answers an error the way dockerd reads it: {"Err": "..."}.
func fail(w http.ResponseWriter, code int, err error) {
	reply(w, code, errResponse{Err: err.Error()})
}

func (d *Driver) create(w http.ResponseWriter, r *http.Request) {
	var req createRequest
	if !decodeNamed(w, r, &req, &req.Name) {
		return
	}
	opts, err := ParseCreateOptions(req.Opts)
	if err != nil {
		fail(w, http.StatusBadRequest, err)
		return
	}
	if err := d.backend.Create(r.Context(), req.Name, opts); err != nil {
		d.log.Warn("docker volume create refused", "volume", req.Name, "err", err)
		fail(w, http.StatusInternalServerError, err)
		return
	}
	d.log.Info("volume created for docker", "volume", req.Name, "replicas", opts.Replicas)
	reply(w, http.StatusOK, errResponse{})
}

func (d *Driver) remove(w http.ResponseWriter, r *http.Request) {
	var req nameRequest
	if !decodeNamed(w, r, &req, &req.Name) {
		return
	}
	if n := d.mounts.count(req.Name); n > 0 && d.inUse != nil {
		// Docker asks to remove a volume it counts as unused: the mounts
		// here may be stale (containers that stopped while the driver was
		// down); the Engine serves its API by now.
		if _, err := d.ForgetStaleMounts(r.Context(), req.Name, d.inUse); err != nil {
			d.log.Warn("could not check the volume's mounts with the Docker Engine", "volume", req.Name, "err", err)
		}
	}
	if n := d.mounts.count(req.Name); n > 0 {
		fail(w, http.StatusConflict, fmt.Errorf("volume %s is still mounted %d time(s) on this host; stop the containers using it first", req.Name, n))
		return
	}
	if err := d.backend.Remove(r.Context(), req.Name); err != nil {
		d.log.Warn("docker volume rm refused", "volume", req.Name, "err", err)
		fail(w, http.StatusInternalServerError, err)
		return
	}
	d.log.Info("volume removed by docker", "volume", req.Name)
	reply(w, http.StatusOK, errResponse{})
}

func (d *Driver) mount(w http.ResponseWriter, r *http.Request) {
	var req mountRequest
	if !decodeNamed(w, r, &req, &req.Name) {
		return
	}
	if err := validateMountID(req.ID); err != nil {
		fail(w, http.StatusBadRequest, err)
		return
	}
	m := d.lock(req.Name)
	m.Lock()
	defer m.Unlock()
	mp, err := d.backend.Mount(r.Context(), req.Name)
	if err != nil {
		d.log.Warn("mount refused", "volume", req.Name, "id", req.ID, "err", err)
		fail(w, http.StatusInternalServerError, err)
		return
	}
	total, err := d.mounts.add(req.Name, req.ID)
	if err != nil {
		fail(w, http.StatusInternalServerError, fmt.Errorf("recording the mount of %s: %w", req.Name, err))
		return
	}
	d.log.Info("volume mounted", "volume", req.Name, "id", req.ID, "mounts_here", total, "path", mp)
	reply(w, http.StatusOK, mountResponse{Mountpoint: mp})
}

func (d *Driver) unmount(w http.ResponseWriter, r *http.Request) {
	var req mountRequest
	if !decodeNamed(w, r, &req, &req.Name) {
		return
	}
	total, err := d.mounts.remove(req.Name, req.ID)
	if err != nil {
		fail(w, http.StatusInternalServerError, fmt.Errorf("recording the unmount of %s: %w", req.Name, err))
		return
	}
	d.log.Info("volume unmounted", "volume", req.Name, "id", req.ID, "mounts_here", total)
	reply(w, http.StatusOK, errResponse{})
}

func (d *Driver) path(w http.ResponseWriter, r *http.Request) {
	v, found, ok := d.lookupRequest(w, r)
	if !ok {
		return
	}
	if !found {
		fail(w, http.StatusNotFound, fmt.Errorf("no such volume: %s", v.Name))
		return
	}
	reply(w, http.StatusOK, mountResponse{Mountpoint: v.Mountpoint})
}

// decodeNamed decodes a request into req and checks the volume name it
// carries (*name, a field of req); on failure it has answered itself.
func decodeNamed(w http.ResponseWriter, r *http.Request, req any, name *string) bool {
	if !decode(w, r, req) {
		return false
	}
	if err := ValidateName(*name); err != nil {
		fail(w, http.StatusBadRequest, err)
		return false
	}
	return true
}

// lookupRequest decodes and checks a request naming a volume and looks the
// volume up. When ok is false it has answered the request itself; when
// found is false, v holds only the name.
func (d *Driver) lookupRequest(w http.ResponseWriter, r *http.Request) (v Volume, found, ok bool) {
	var req nameRequest
	if !decodeNamed(w, r, &req, &req.Name) {
		return Volume{}, false, false
	}
	v, found, err := d.lookup(r.Context(), req.Name)
	if err != nil {
		fail(w, http.StatusServiceUnavailable, err)
		return Volume{}, false, false
	}
	if !found {
		v = Volume{Name: req.Name}
	}
	return v, found, true
}

func (d *Driver) get(w http.ResponseWriter, r *http.Request) {
	v, found, ok := d.lookupRequest(w, r)
	if !ok {
		return
	}
	if !found {
		// No volume and no error: dockerd says "no such volume", and
		// `docker volume create` goes on to Create.
		reply(w, http.StatusOK, getResponse{})
		return
	}
	wv := toWire(v)
	reply(w, http.StatusOK, getResponse{Volume: &wv})
}

// lookup answers from the backend, waiting for its catalog only when the
// name is unknown (a restarting agent must not make Docker forget a volume
// that its catalog has not replayed yet).
func (d *Driver) lookup(ctx context.Context, name string) (Volume, bool, error) {
	if v, ok := d.backend.Get(name); ok {
		return v, true, nil
	}
	ctx, cancel := context.WithTimeout(ctx, d.readyTimeout)
	defer cancel()
	if err := d.backend.WaitReady(ctx); err != nil {
		return Volume{}, false, fmt.Errorf("tether's catalog is not ready yet, cannot tell whether volume %s exists: %w", name, err)
	}
	v, ok := d.backend.Get(name)
	return v, ok, nil
}

func (d *Driver) list(w http.ResponseWriter, r *http.Request) {
	var req struct{}
	if !decode(w, r, &req) {
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), d.readyTimeout)
	defer cancel()
	if err := d.backend.WaitReady(ctx); err != nil {
		d.log.Warn("listing volumes for docker before the catalog is ready; the list may be incomplete", "err", err)
	}
	resp := listResponse{Volumes: []wireVolume{}}
	for _, v := range d.backend.List() {
		resp.Volumes = append(resp.Volumes, toWire(v))
	}
	reply(w, http.StatusOK, resp)
}

func toWire(v Volume) wireVolume {
	wv := wireVolume{Name: v.Name, Mountpoint: v.Mountpoint, Status: v.Status}
	if !v.CreatedAt.IsZero() {
		wv.CreatedAt = v.CreatedAt.UTC().Format(time.RFC3339)
	}
	return wv
}
