package volumedriver

// Wire types of Docker's volume plugin protocol (docker/cli
// docs/extend/plugins_volume.md; engine structs in moby
// daemon/volume/drivers/proxy.go). Every call is POST /<Method> with a JSON
// body; an error is {"Err": "..."}.

// implementsResponse answers /Plugin.Activate.
type implementsResponse struct {
	Implements []string `json:"Implements"`
}

type nameRequest struct {
	Name string `json:"Name"`
}

type createRequest struct {
	Name string            `json:"Name"`
	Opts map[string]string `json:"Opts"`
}

type mountRequest struct {
	Name string `json:"Name"`
	ID   string `json:"ID"`
}

type errResponse struct {
	Err string `json:"Err"`
}

type mountResponse struct {
	Mountpoint string `json:"Mountpoint"`
	Err        string `json:"Err"`
}

// wireVolume is one volume as Docker decodes it: CreatedAt must be RFC 3339
// (the engine parses it into a time.Time and drops the volume otherwise).
type wireVolume struct {
	Name       string         `json:"Name"`
	Mountpoint string         `json:"Mountpoint,omitempty"`
	CreatedAt  string         `json:"CreatedAt,omitempty"`
	Status     map[string]any `json:"Status,omitempty"`
}

type getResponse struct {
	// Volume is null for a name the driver does not have: dockerd then says
	// "no such volume" (and its Get-before-Create goes on to Create).
	Volume *wireVolume `json:"Volume"`
	Err    string      `json:"Err"`
}

type listResponse struct {
	Volumes []wireVolume `json:"Volumes"`
	Err     string       `json:"Err"`
}

type capabilitiesResponse struct {
	Capabilities capabilities `json:"Capabilities"`
}

type capabilities struct {
	Scope string `json:"Scope"`
}
