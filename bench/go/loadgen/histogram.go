package main

import (
	"math/bits"
	"time"
)

// histogram records latencies in bounded memory with under 1% relative error: one bucket per
// microsecond below 256 µs, then 128 buckets per power of two. A run of any length costs the
// same few kilobytes per worker, where keeping every sample would grow with the run.
type histogram struct {
	counts []uint64
	total  uint64
	sum    time.Duration
	max    time.Duration
}

const (
	linearBuckets = 256 // exact microseconds below this
	subBuckets    = 128 // per power of two above it
	maxExponent   = 40  // 2^(40+8) µs: far beyond any deadline we use
)

func newHistogram() *histogram {
	return &histogram{counts: make([]uint64, linearBuckets+maxExponent*subBuckets)}
}

func bucketOf(us uint64) int {
	if us < linearBuckets {
		return int(us)
	}
	exp := bits.Len64(us) - 8 // us>>exp is in [128, 256)
	if exp > maxExponent {
		return linearBuckets + maxExponent*subBuckets - 1
	}
	return linearBuckets + (exp-1)*subBuckets + int(us>>uint(exp)) - subBuckets
}

// bucketMid is a representative value (the middle) of bucket i, in microseconds.
func bucketMid(i int) float64 {
	if i < linearBuckets {
		return float64(i) + 0.5
	}
	exp := (i-linearBuckets)/subBuckets + 1
	low := uint64((i-linearBuckets)%subBuckets+subBuckets) << uint(exp)
	return float64(low) + float64(uint64(1)<<uint(exp))/2
}

func (h *histogram) record(d time.Duration) {
	if d < 0 {
		d = 0
	}
	h.counts[bucketOf(uint64(d/time.Microsecond))]++
	h.total++
	h.sum += d
	if d > h.max {
		h.max = d
	}
}

func (h *histogram) merge(o *histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.total += o.total
	h.sum += o.sum
	if o.max > h.max {
		h.max = o.max
	}
}

// quantileMs returns the q-quantile in milliseconds (0 when empty), never above the maximum.
func (h *histogram) quantileMs(q float64) float64 {
	if h.total == 0 {
		return 0
	}
	rank := uint64(q*float64(h.total) + 0.5)
	if rank < 1 {
		rank = 1
	}
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			v := bucketMid(i) / 1000
			if maxMs := h.max.Seconds() * 1000; v > maxMs {
				return maxMs
			}
			return v
		}
	}
	return h.max.Seconds() * 1000
}

func (h *histogram) meanMs() float64 {
	if h.total == 0 {
		return 0
	}
	return h.sum.Seconds() * 1000 / float64(h.total)
}
